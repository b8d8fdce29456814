"""Floating-point dtypes as named by safetensors, MindSpore checkpoints and users, and casts of raw tensor bytes."""

from __future__ import annotations

import numpy as np

from qwenbuild.errors import UserError

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = tuple(ITEMSIZE)
SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
MINDSPORE = {"float32": "Float32", "bfloat16": "BFloat16", "float16": "Float16"}
# the short names of --dtype flags
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
USER = {**{name: name for name in DTYPES}, **{short: name for name, short in SHORT.items()}}


def from_safetensors(code: str, where: str) -> str:
    for name, st in SAFETENSORS.items():
        if st == code:
            return name
    raise UserError(f"{where} has dtype {code}; only F32, BF16 and F16 tensors can be converted")


def from_mindspore(code: str, where: str) -> str:
    for name, ms_name in MINDSPORE.items():
        if ms_name == code:
            return name
    raise UserError(f"{where} has dtype {code}; only Float32, BFloat16 and Float16 tensors can be converted")


def from_user(text: str | None) -> str | None:
    if text is None:
        return None
    if text.lower() not in USER:
        raise UserError(f"unknown dtype {text!r}",
                        hint="use bf16, fp16 or fp32 (or leave it out to keep the source dtype)")
    return USER[text.lower()]


def _to_float32(buf: bytes, src: str) -> np.ndarray:
    if src == "float32":
        return np.frombuffer(buf, dtype="<f4")
    if src == "float16":
        return np.frombuffer(buf, dtype="<f2").astype("<f4")
    return (np.frombuffer(buf, dtype="<u2").astype("<u4") << 16).view("<f4")


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 to nearest even, as torch and MindSpore do; NaN stays a quiet NaN."""
    bits = x.view("<u4")
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype("<u2")
    return rounded


def cast_bytes(buf: bytes, src: str, dst: str) -> bytes:
    """Raw little-endian bytes of `src` elements converted to `dst` elements."""
    if src == dst:
        return buf
    x = _to_float32(buf, src)
    if dst == "float32":
        return x.tobytes()
    if dst == "float16":
        return x.astype("<f2").tobytes()
    return _bfloat16_bits(x).tobytes()
