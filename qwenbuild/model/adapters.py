"""LoRA adapters put on a built network: on the target projections of every layer, as this process's slices of the
split the strategy files give, with dropout on their input while training."""

from __future__ import annotations

import zlib

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from qwenbuild.errors import UserError
from qwenbuild.model import lora as lora_names
from qwenbuild.model.lora import LoraConfig

F32 = ms.float32


class AdapterDropout(nn.Cell):
    """Dropout of an adapter's input x [rows, part] while training, by a mask the training loop sets before each
    step (set_dropout_masks): drawn on the host from the step, the adapter and the data-parallel rank, for the
    whole input width, this process keeping its columns from `start`. So every layout of a run, and a run resumed
    from a checkpoint, drops exactly what one uninterrupted process would (MindSpore's Dropout kernel on CPU
    draws differently from run to run)."""

    def __init__(self, cell: str, p: float, rows: int, width: int, start: int, part: int):
        super().__init__()
        self.cell, self.p, self.width, self.start = cell, p, width, start
        self.mask = Parameter(Tensor(np.ones((rows, part), np.float32)), name="mask", requires_grad=False)

    def construct(self, x):
        if not self.training:
            return x
        return x * self.mask

    def draw(self, seed: int, dp_index: int, step: int) -> np.ndarray:
        """The scaled mask of `step` (0-based): zeros where the input is dropped, 1 / (1 - p) elsewhere."""
        rng = np.random.default_rng([seed, dp_index, zlib.crc32(self.cell.encode()), step])
        kept = rng.random((self.mask.shape[0], self.width), dtype=np.float32) >= np.float32(self.p)
        return kept[:, self.start:self.start + self.mask.shape[1]].astype(np.float32) / np.float32(1.0 - self.p)


class NoDropout(nn.Cell):
    def construct(self, x):
        return x


def set_dropout_masks(net, seed: int, step: int) -> None:
    """Give every adapter's dropout its mask for `step`; a network without adapter dropout is left alone."""
    layout = net.parallel.layout
    dp_index = layout.dp_index if layout else 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, AdapterDropout):
            cell.mask.set_data(Tensor(cell.draw(seed, dp_index, step)))


def _linear(net, cell: str):
    """The Linear cell of a MindFormers cell name (model.layers.3.attention.wq)."""
    _, _, index, block, name = cell.split(".")
    return getattr(getattr(net.model.layers[int(index)], block), name)


def add_adapters(net, lora: LoraConfig, rows: int) -> list:
    """Adapters on lora.targets of every layer of `net` (a QwenForCausalLM), each split as the strategy files say,
    which must be as its weight is; returns the adapter parameters. Their values are zero until loaded or
    initialised (init_adapters). Dropout acts while the network is set to train, on inputs of `rows` tokens."""
    parallel = net.parallel
    params = []
    for cell in lora_names.target_cells(net.cfg, lora.targets):
        linear = _linear(net, cell)
        weight_split = parallel.split(f"{cell}.weight")
        for part in (lora_names.A, lora_names.B):
            expected, found = lora_names.split_dim(f"{cell}.{part}", weight_split), parallel.split(f"{cell}.{part}")
            if found != expected:
                raise UserError(f"the strategy files split {cell}.{part} on {found}, but beside {cell}.weight split on "
                                f"{weight_split} it must be {expected}",
                                hint="rebuild the strategy files with train.method = \"lora\" (doit strategy)")
        row_parallel = weight_split == 1
        width = linear.n_in * (parallel.size if row_parallel else 1)
        start = linear.n_in * parallel.index if row_parallel else 0
        dropout = AdapterDropout(cell, lora.dropout, rows, width, start, linear.n_in) if lora.dropout \
            else NoDropout()
        linear.add_adapter(cell, lora.rank, lora.scale, dropout)
        # a cell set on a built one is named by its attribute only
        dropout.update_parameters_name(f"{cell}.lora_dropout.")
        params += [linear.mindpet_delta_lora_a, linear.mindpet_delta_lora_b]
    return params


def init_adapters(params: list, lora: LoraConfig, cfg, parallel, seed: int) -> None:
    """First values of the adapters (model/lora.py initial_value): drawn whole, this process's slice kept."""
    shapes = lora_names.adapter_shapes(cfg, lora)
    for param in params:
        value = lora_names.initial_value(param.name, shapes[param.name], seed)
        dim = parallel.split(param.name)
        if dim is not None:
            part = value.shape[dim] // parallel.size
            value = np.take(value, range(parallel.index * part, (parallel.index + 1) * part), axis=dim)
        param.set_data(Tensor(np.ascontiguousarray(value), F32))
