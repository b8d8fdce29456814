"""One typed object per qwen.toml section, its fields exactly the keys of schemas/qwen.schema.json.

Defaults live in the schema only: a section is built from a manifest whose defaults the schema has filled in, and
a key without a default is None when the manifest leaves it out. A property computed from several keys says which
in `READS`, so a build task may use it only when it declared all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from qwenbuild.model.config import QwenConfig
from qwenbuild.model.lora import LoraConfig

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(QwenConfig))


@dataclasses.dataclass(frozen=True)
class Model:
    preset: str | None
    init: str
    hf_dir: str | None
    init_seed: int
    init_std: float
    hidden_size: int
    num_layers: int
    num_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_has_bias: bool
    tie_word_embeddings: bool
    param_dtype: str
    compute_dtype: str

    READS: ClassVar[dict[str, tuple[str, ...]]] = {"config": _CONFIG_FIELDS}

    @property
    def config(self) -> QwenConfig:
        """The network's dimensions and dtypes, resolved from the preset, hf_dir's config.json and explicit keys."""
        return QwenConfig(**{name: getattr(self, name) for name in _CONFIG_FIELDS})


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    kind: str
    vocab_size: int
    dir: str | None


@dataclasses.dataclass(frozen=True)
class Dataset:
    source: str
    path: str | None
    seq_length: int
    num_train: int
    num_heldout: int
    seed: int
    mask_prompt: bool
    skip_bad_rows: bool
    file_partition: int


@dataclasses.dataclass(frozen=True)
class Node:
    host: str
    ip: str
    device_ids: tuple[int, ...] | None
    device_ips: tuple[str, ...] | None
    rank_table: str | None


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str
    devices_per_node: int
    device_memory_gb: float
    device_ip_source: str
    master_port: int
    python: str
    env_script: str | None
    nodes: tuple[Node, ...]

    READS: ClassVar[dict[str, tuple[str, ...]]] = {
        "device_count": ("nodes", "devices_per_node"),
        "device_ids": ("nodes", "devices_per_node"),
    }

    @property
    def device_count(self) -> int:
        return len(self.nodes) * self.devices_per_node

    def device_ids(self, node: Node) -> list[int]:
        """Physical device ids a node uses, in rank order (0..devices_per_node-1 unless listed)."""
        return list(node.device_ids) if node.device_ids else list(range(self.devices_per_node))


@dataclasses.dataclass(frozen=True)
class Parallel:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    vocab_emb_dp: bool
    gradient_aggregation_group: int
    use_seq_parallel: bool
    recompute: bool
    offset: tuple[int, ...] | None
    strategy_dir: str | None

    READS: ClassVar[dict[str, tuple[str, ...]]] = {
        "world_size": ("data_parallel", "model_parallel", "pipeline_stage"),
        "stage_offset": ("offset",),
    }

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def stage_offset(self) -> list[int] | int:
        """MindFormers' model_config.offset: extra layers per stage, 0 for an even split."""
        return list(self.offset) if self.offset else 0


@dataclasses.dataclass(frozen=True)
class Train:
    READS: ClassVar[dict[str, tuple[str, ...]]] = {"engine_on": ("engine",), "lora_config": ("method", "lora")}

    engine: str | None
    method: str
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    epochs: int
    steps: int | None
    batch_size: int
    seed: int
    save_steps: int
    eval_max_new_tokens: int
    lora: LoraConfig  # [train.lora] as written; trained only when method is "lora"

    @property
    def lora_config(self) -> LoraConfig | None:
        """The adapters to train, or None for a full fine-tune."""
        return self.lora if self.method == "lora" else None

    def engine_on(self, device: str) -> str:
        """Who trains on this device: train.engine, else MindFormers on Ascend and qwenbuild's loop on CPU."""
        return self.engine or ("mindformers" if device == "ascend" else "qwenbuild")


@dataclasses.dataclass(frozen=True)
class Export:
    READS: ClassVar[dict[str, tuple[str, ...]]] = {"dtype_on": ("dtype",)}

    checkpoint: str
    seq_length: int
    batch_size: int
    model_parallel: int
    use_past: bool
    dtype: str | None
    predict_data: str | None
    max_new_tokens: int

    def dtype_on(self, device: str, param_dtype: str) -> str:
        """The exported weights' dtype on this device: export.dtype, else the model's on Ascend (as the original
        deploys) and float32 on CPU."""
        return self.dtype or (param_dtype if device == "ascend" else "float32")


@dataclasses.dataclass(frozen=True)
class Lite:
    ascend_context: dict
    ge_session_options: dict
    ge_graph_options: dict


@dataclasses.dataclass(frozen=True)
class Build:
    dir: str


SECTIONS: dict[str, type] = {"model": Model, "tokenizer": Tokenizer, "dataset": Dataset, "hardware": Hardware,
                             "parallel": Parallel, "train": Train, "export": Export, "lite": Lite, "build": Build}


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def build_section(cls: type, values: dict) -> Any:
    """A section object from the section's table, defaults already filled; absent keys become None."""
    fields = {}
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if cls is Hardware and f.name == "nodes":
            value = tuple(build_section(Node, n) for n in value)
        if cls is Train and f.name == "lora":
            value = build_section(LoraConfig, value)
        fields[f.name] = _frozen(value)
    return cls(**fields)


def to_json(value):
    """The TOML-shaped value of a section, key or node: tables as dicts without the keys left out, arrays as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
