"""LoRA adapters of the Qwen1.5 network: which projections carry them, their names, shapes, first values and counts.

An adapter on a projection W [out, in] is A [rank, in] and B [out, rank]; the projection computes
x W^T + (alpha / rank) B A x. Parameters are named as MindFormers' LoRA (mindpet's LoRADense) names them:
`<cell>.mindpet_delta_lora_a` and `<cell>.mindpet_delta_lora_b`, with `<cell>` the projection's cell, e.g.
`model.layers.0.attention.wq`. Targets are given by their Hugging Face module names (q_proj, ...).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import layer_parameter_shapes, ms_to_hf, num_parameters

# Hugging Face module name -> the MindFormers cell inside a decoder layer
TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
           "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}
A, B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"
# the dropout mask of an adapter's input (<cell>.lora_dropout.mask), set before each training step; never saved
DROPOUT_MASK = "lora_dropout.mask"
# the cells model parallelism splits on the output dimension (column-parallel); the others on the input dimension
_COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """What the adapter's output is multiplied by: alpha / rank (never 1 by default)."""
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    return name.endswith((f".{A}", f".{B}"))


def is_dropout_mask(name: str) -> bool:
    return name.endswith(f".{DROPOUT_MASK}")


def cell_of(name: str) -> str:
    """The projection cell a parameter (weight, bias or adapter) belongs to."""
    return name.rsplit(".", 1)[0]


def weight_of(adapter: str) -> str:
    """The frozen weight an adapter parameter adds to."""
    return f"{cell_of(adapter)}.weight"


def target_cells(cfg: QwenConfig, targets) -> list[str]:
    """Every adapted cell of the network, layer by layer in the order of `targets`."""
    return [f"model.layers.{i}.{TARGETS[t]}" for i in range(cfg.num_layers) for t in targets]


def target_shapes(cfg: QwenConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each target's weight (the same in every layer)."""
    shapes = layer_parameter_shapes(cfg, 0)
    return {t: shapes[f"model.layers.0.{cell}.weight"] for t, cell in TARGETS.items()}


def adapter_shapes(cfg: QwenConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every adapter parameter and its whole shape: A [rank, in], B [out, rank]."""
    shapes = target_shapes(cfg)
    out = {}
    for i in range(cfg.num_layers):
        for t in lora.targets:
            n_out, n_in = shapes[t]
            cell = f"model.layers.{i}.{TARGETS[t]}"
            out[f"{cell}.{A}"] = (lora.rank, n_in)
            out[f"{cell}.{B}"] = (n_out, lora.rank)
    return out


def rank_problems(cfg: QwenConfig, rank: int, targets) -> list[str]:
    """Why `rank` does not fit a target: it must stay below the smaller dimension of every target's weight."""
    shapes = target_shapes(cfg)
    return [f"rank {rank} is not below {min(shapes[t])}, the smaller dimension of {t} {list(shapes[t])}"
            for t in targets if t in shapes and rank >= min(shapes[t])]


def split_dim(adapter: str, weight_split: int | None) -> int | None:
    """The dimension of an adapter parameter that model parallelism splits, from its weight's split: a column-parallel
    weight (split on its output rows) splits B's rows, a row-parallel one (split on its input columns) A's columns."""
    if weight_split is None:
        return None
    if adapter.endswith(A):
        return 1 if weight_split == 1 else None
    return 0 if weight_split == 0 else None


def summed_over_model_parallel(adapter: str, weight_split: int | None) -> bool:
    """True for an adapter parameter held whole while its weight is split: each model-parallel process sees only
    its slice's share of the gradient, so the shares are summed."""
    return weight_split is not None and split_dim(adapter, weight_split) is None


def initial_value(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A's first values as peft draws them (kaiming-uniform with a = sqrt(5): uniform within 1/sqrt(in)), B zero;
    the whole tensor from the training seed and the name, so every layout of the run starts alike."""
    if name.endswith(B):
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def trainable_parameters(cfg: QwenConfig, lora: LoraConfig | None) -> int:
    """Parameters that get gradients and AdamW moments: every one for a full fine-tune, the adapters for LoRA."""
    if lora is None:
        return num_parameters(cfg)
    return sum(math.prod(s) for s in adapter_shapes(cfg, lora).values())


def layer_adapter_slices(cfg: QwenConfig, lora: LoraConfig, model_parallel: int = 1) -> dict[str, tuple[tuple, tuple]]:
    """Per adapter parameter of one decoder layer (`attention.wq.mindpet_delta_lora_a`, ...): (whole shape, one
    device's slice under `model_parallel`). A column-parallel target keeps A whole and 1/mp of B's rows, a
    row-parallel one 1/mp of A's columns and B whole."""
    shapes, out = target_shapes(cfg), {}
    for t in lora.targets:
        n_out, n_in = shapes[t]
        column = TARGETS[t] in _COLUMN_PARALLEL
        out[f"{TARGETS[t]}.{A}"] = ((lora.rank, n_in), (lora.rank, n_in if column else n_in // model_parallel))
        out[f"{TARGETS[t]}.{B}"] = ((n_out, lora.rank), (n_out // model_parallel if column else n_out, lora.rank))
    return out


def layer_adapter_parameters(cfg: QwenConfig, lora: LoraConfig, model_parallel: int = 1) -> float:
    """Adapter parameters one device holds per decoder layer under `model_parallel`."""
    return sum(math.prod(part) for _, part in layer_adapter_slices(cfg, lora, model_parallel).values())


def cell_regex(targets) -> str:
    """MindFormers' pet_config.target_modules: one regex matched against each cell's own name."""
    return "|".join(f".*{TARGETS[t].rsplit('.', 1)[1]}" for t in targets)


def peft_key(adapter: str) -> str:
    """The key of an adapter parameter in a PEFT adapter_model.safetensors."""
    module = ms_to_hf(weight_of(adapter))[:-len(".weight")]
    return f"base_model.model.{module}.lora_{'A' if adapter.endswith(A) else 'B'}.weight"
