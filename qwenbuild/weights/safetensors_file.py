"""Safetensors files read and written tensor by tensor, so memory never holds more than one chunk of a tensor."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from qwenbuild import dtypes
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import BadJSON, parse_json

CHUNK_BYTES = 16 << 20
_HEADER_LIMIT = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: where its bytes are, and what they are."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | bfloat16 | float16
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        step = max(chunk_bytes - chunk_bytes % dtypes.ITEMSIZE[self.dtype], dtypes.ITEMSIZE[self.dtype])
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.nbytes
            while left:
                data = f.read(min(step, left))
                if not data:
                    raise UserError(f"{self.path} ends inside tensor {self.name}: the file is truncated",
                                    hint="download or copy the file again")
                left -= len(data)
                yield data


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(path: str | os.PathLike) -> tuple[list[TensorEntry], dict]:
    """Entries (in file order) and __metadata__ of a safetensors file, after checking the file is complete."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT or 8 + length > size:
            raise UserError(f"{path} has a header of {length} bytes but the file has {size}: it is truncated or "
                            "not a safetensors file")
        try:
            header = parse_json(f.read(length))
        except (BadJSON, UnicodeDecodeError) as exc:
            raise UserError(f"{path} has an unreadable safetensors header: {exc}")
    metadata = header.pop("__metadata__", None) or {}
    base, entries, end = 8 + length, [], 0
    for name, info in header.items():
        where = f"{path}: tensor {name}"
        try:
            dtype_code, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where} has a malformed header entry {info!r}")
        dtype = dtypes.from_safetensors(dtype_code, where)
        if stop - start != _numel(shape) * dtypes.ITEMSIZE[dtype]:
            raise UserError(f"{where} holds {stop - start} bytes, not the {_numel(shape)} x {dtype} its shape needs")
        entries.append(TensorEntry(name, shape, dtype, path, base + start, stop - start))
        end = max(end, stop)
    if base + end != size:
        state = "is truncated" if base + end > size else "has trailing bytes"
        raise UserError(f"{path} {state}: the header describes {base + end} bytes, the file has {size}",
                        hint="download or copy the file again")
    entries.sort(key=lambda e: e.offset)
    return entries, metadata


@dataclass(frozen=True)
class TensorToWrite:
    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Callable[[], Iterable[bytes]]  # yields the tensor's bytes in order

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * dtypes.ITEMSIZE[self.dtype]


def write(path: str | os.PathLike, tensors: list[TensorToWrite], metadata: dict | None = None,
          progress: Callable[[TensorToWrite], None] | None = None) -> int:
    """Write tensors in the given order; returns the number of bytes written."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for t in tensors:
        header[t.name] = {"dtype": dtypes.SAFETENSORS[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                f.write(chunk)
                written += len(chunk)
            if written != t.nbytes:
                raise RuntimeError(f"tensor {t.name}: produced {written} bytes, expected {t.nbytes}")
            if progress:
                progress(t)
    return 8 + len(text) + offset
