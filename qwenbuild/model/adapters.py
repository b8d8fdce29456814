"""LoRA adapters put on a built network: on the target projections of every layer, as this process's slices of the
split the strategy files give, with dropout on their input while training."""

from __future__ import annotations

import zlib

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from qwenbuild.errors import UserError
from qwenbuild.model import lora as lora_names
from qwenbuild.model.lora import LoraConfig

F32 = ms.float32


class AdapterDropout(nn.Cell):
    """Dropout of an adapter's input x [N, part]: the mask is drawn for the whole input width [N, width] and this
    process takes its columns from `start`, so a split projection drops what the whole one would; seeded per
    adapter, so every layout of a run draws the same masks."""

    def __init__(self, p: float, width: int, start: int, seed: int, name: str):
        super().__init__()
        self.width, self.start = width, start
        self.dropout = ops.Dropout(keep_prob=1.0 - p, Seed0=seed, Seed1=zlib.crc32(name.encode()) & 0x7FFFFFFF)

    def construct(self, x):
        if not self.training:
            return x
        scaled_mask, _ = self.dropout(ops.ones((x.shape[0], self.width), F32))
        if self.width != x.shape[1]:
            scaled_mask = scaled_mask[:, self.start:self.start + x.shape[1]]
        return x * scaled_mask


class NoDropout(nn.Cell):
    def construct(self, x):
        return x


def _linear(net, cell: str):
    """The Linear cell of a MindFormers cell name (model.layers.3.attention.wq)."""
    _, _, index, block, name = cell.split(".")
    return getattr(getattr(net.model.layers[int(index)], block), name)


def add_adapters(net, lora: LoraConfig, seed: int) -> list:
    """Adapters on lora.targets of every layer of `net` (a QwenForCausalLM), each split as the strategy files say,
    which must be as its weight is; returns the adapter parameters. Their values are zero until loaded or
    initialised (init_adapters). Dropout acts while the network is set to train."""
    parallel = net.parallel
    # data-parallel ranks train on other rows: other masks; model-parallel ranks of one slice draw the same
    dp_index = parallel.layout.dp_index if parallel.layout else 0
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
        dropout = AdapterDropout(lora.dropout, width, start, seed + 7919 * dp_index, cell) if lora.dropout \
            else NoDropout()
        linear.add_adapter(cell, lora.rank, lora.scale, dropout)
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
