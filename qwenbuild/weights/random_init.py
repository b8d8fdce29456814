"""A small Qwen1.5-architecture Hugging Face checkpoint drawn from a seed: the same bytes on every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenbuild import dtypes
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import ms_to_hf, parameter_shapes
from qwenbuild.store import atomic_path
from qwenbuild.weights import hf_output
from qwenbuild.weights.safetensors_file import TensorToWrite

STD = 0.02  # Hugging Face's initializer_range for Qwen1.5
# values drawn per chunk so memory stays small; fixed so the draw order (and the bytes) never change
_DRAW = 1 << 22


def _values(rng: np.random.Generator, name: str, count: int, dtype: str, std: float):
    def chunks():
        for start in range(0, count, _DRAW):
            n = min(_DRAW, count - start)
            if "norm" in name:  # RMSNorm weights: attention_norm, ffn_norm, norm_out
                x = np.ones(n, dtype="<f4")
            else:
                x = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
            yield dtypes.cast_bytes(x.astype("<f4").tobytes(), "float32", dtype)
    return chunks


def random_tensors(cfg: QwenConfig, seed: int, std: float = STD) -> list[TensorToWrite]:
    """HF-named tensors in network order: normal(0, std) matrices and biases, ones for RMSNorm weights.

    Values are drawn lazily in this order, so the tensors must be consumed in order, once.
    """
    rng = np.random.default_rng(seed)
    tensors = []
    for ms_name, shape in parameter_shapes(cfg).items():
        count = int(np.prod(shape))
        tensors.append(TensorToWrite(ms_to_hf(ms_name), shape, cfg.param_dtype,
                                     _values(rng, ms_name, count, cfg.param_dtype, std)))
    return tensors


def write_random_hf_model(cfg: QwenConfig, seed: int, out_dir, std: float = STD) -> Path:
    """Write model.safetensors + config.json (Qwen1.5 format) of a seeded random model; returns out_dir."""
    out = Path(out_dir)
    with atomic_path(out, directory=True) as tmp:
        hf_output.write_model_dir(tmp, cfg, random_tensors(cfg, seed, std), max_shard_bytes=1 << 62)
    return out
