"""Qwen1.5 dimensions in one dataclass, read from and written to a Hugging Face config.json (Qwen1.5 form)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwenbuild import schema
from qwenbuild.dtypes import DTYPES
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json
from qwenbuild.tokenizer.files import ENDOFTEXT, QWEN_SPECIAL_IDS

# config.json keys of a Qwen1.5 (Qwen2ForCausalLM) checkpoint, by QwenConfig field
HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}


MODEL_TYPE, ARCHITECTURE = "qwen2", "Qwen2ForCausalLM"


def _checked(field: str, key: str, value):
    """A config.json value, checked by the rule qwen.toml's model.<field> has in the schema (types, finite numbers,
    bounds): one rule for the same number wherever it is written."""
    problem = schema.value_problem(f"model.{field}", value)
    if problem:
        raise UserError(f"key {key!r}: {problem}")
    return value


def _check_kind(hf: dict) -> None:
    """A config.json of another model family is refused by name, not read as if its keys meant Qwen's."""
    kind = hf.get("model_type")
    if kind is not None and kind != MODEL_TYPE:
        raise UserError(f"key 'model_type' is {kind!r}; qwenbuild reads Qwen1.5 checkpoints (model_type "
                        f"{MODEL_TYPE!r})", hint="point at a Qwen1.5 (Qwen2 architecture) model directory")
    architectures = hf.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or ARCHITECTURE not in architectures):
        raise UserError(f"key 'architectures' is {architectures!r}; a Qwen1.5 checkpoint lists {ARCHITECTURE!r}",
                        hint="point at a Qwen1.5 (Qwen2 architecture) model directory")


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    n_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    qkv_has_bias: bool = True
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number >= 1, not {value!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.n_kv_heads:
            raise UserError(f"num_heads {self.num_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"{name} must be one of {', '.join(DTYPES)}, not {getattr(self, name)!r}")

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "QwenConfig":
        """Read the dimensions of a Hugging Face Qwen2/Qwen1.5 config.json dict."""
        if not isinstance(hf, dict):
            raise UserError(f"config.json holds a JSON {type(hf).__name__}, not an object of model settings")
        _check_kind(hf)
        values = {}
        for field, key in HF_KEYS.items():
            if key in hf:
                values[field] = _checked(field, key, hf[key])
        if "num_key_value_heads" not in hf and "num_attention_heads" in hf:
            values["n_kv_heads"] = values["num_heads"]
        # transformers 5.x moves rope_theta under rope_parameters; 4.57 would silently fall back to 10000
        if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):
            values["rope_theta"] = _checked("rope_theta", "rope_parameters.rope_theta",
                                            hf["rope_parameters"].get("rope_theta", 10000.0))
        dtype = hf.get("torch_dtype") or hf.get("dtype")
        if dtype in DTYPES:
            values["param_dtype"] = dtype
        missing = [HF_KEYS[f] for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
                   if f not in values]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}", hint="point at a Qwen1.5/Qwen2 model directory")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_hf_dir(cls, directory: str | Path, **overrides) -> "QwenConfig":
        path = Path(directory) / "config.json"
        hf = read_json(path, "model config", hint="pass the Hugging Face model directory that holds config.json")
        try:
            return cls.from_hf_dict(hf, **overrides)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def to_hf_dict(self) -> dict:
        """config.json as Qwen1.5 checkpoints write it (top-level rope_theta), loadable by transformers 4.37+ and 5.x."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": QWEN_SPECIAL_IDS[ENDOFTEXT],
            "eos_token_id": QWEN_SPECIAL_IDS[ENDOFTEXT],
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "model_type": "qwen2",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.n_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
