"""Read single tensors of a MindSpore .ckpt without loading the file: an index of where each tensor's bytes lie.

A .ckpt is a run of protobuf `Checkpoint.Value` records (tag, tensor{dims, tensor_type, tensor_content}); big tensors
are split into consecutive records with the same tag. mindspore.load_checkpoint parses the whole file into memory,
which is what bounded-memory resharding has to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError

_NP_TYPES = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
             "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
             "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_, "BFloat16": np.uint16}
_CRC_TRAILER = 17  # b"crc_num" + 10-byte big-endian CRC appended by save_checkpoint(crc_check=True)
_HEADER_WINDOW = 1 << 16


@dataclass
class TensorEntry:
    name: str
    dtype: str
    dims: tuple[int, ...]
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (file offset, byte length) of tensor_content

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.chunks)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("truncated varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return result, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def _parse_tensor_header(buf: bytes, pos: int, end: int) -> tuple[list[int], str, int, int]:
    """dims, tensor_type, and (offset, length) of tensor_content inside a TensorProto spanning buf[pos:end]."""
    dims, dtype, content = [], "", (pos, 0)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if num == 1 and wire == 0:
            d, pos = _varint(buf, pos)
            dims.append(d)
        elif num == 1 and wire == 2:
            n, pos = _varint(buf, pos)
            stop = pos + n
            while pos < stop:
                d, pos = _varint(buf, pos)
                dims.append(d)
        elif num == 2 and wire == 2:
            n, pos = _varint(buf, pos)
            dtype = buf[pos:pos + n].decode("utf-8")
            pos += n
        elif num == 3 and wire == 2:
            n, pos = _varint(buf, pos)
            content = (pos, n)
            pos += n  # may run past the window: the content is the last field and is not read here
        else:
            pos = _skip(buf, pos, wire)
    return dims, dtype, content[0], content[1]


class CkptIndex:
    """Names, dtypes, shapes and byte ranges of every tensor in one .ckpt file, in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self._last: str | None = None
        try:
            self._scan()
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path} is not a readable MindSpore checkpoint ({exc})",
                            hint="pass an unencrypted .ckpt written by mindspore.save_checkpoint")
        if not self.entries:
            raise UserError(f"{self.path} holds no tensors", hint="pass a checkpoint written by mindspore.save_checkpoint")

    def _scan(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if size >= _CRC_TRAILER:
                f.seek(size - _CRC_TRAILER)
                if f.read(7) == b"crc_num":
                    size -= _CRC_TRAILER
            pos = 0
            while pos < size:
                f.seek(pos)
                head = f.read(16)
                key, p = _varint(head, 0)
                if key != 0x0A:
                    raise ValueError(f"unexpected field {key >> 3} at byte {pos}")
                length, p = _varint(head, p)
                start = pos + p
                if start + length > size:
                    raise ValueError(f"truncated: the record at byte {pos} needs {start + length} bytes, "
                                     f"the file has {size}")
                self._add_value(f, start, length)
                pos = start + length

    def _add_value(self, f, start: int, length: int) -> None:
        f.seek(start)
        buf = f.read(min(length, _HEADER_WINDOW))
        pos, tag, tensor = 0, None, None
        while pos < len(buf) and tensor is None:
            key, pos = _varint(buf, pos)
            num, wire = key >> 3, key & 7
            if num == 1 and wire == 2:
                n, pos = _varint(buf, pos)
                tag = buf[pos:pos + n].decode("utf-8")
                pos += n
            elif num == 2 and wire == 2:
                n, pos = _varint(buf, pos)
                tensor = _parse_tensor_header(buf, pos, pos + n)
            elif num == 3:
                raise ValueError(f"tensor {tag!r} is a map parameter, which resharding does not handle")
            else:
                pos = _skip(buf, pos, wire)
        if tag is None or tensor is None:
            raise ValueError(f"record at byte {start} has no tag or tensor")
        dims, dtype, offset, n = tensor
        if dtype not in _NP_TYPES:
            raise ValueError(f"tensor {tag!r} has type {dtype!r}, which resharding does not handle")
        if tag == self._last:
            self.entries[tag].chunks.append((start + offset, n))
        else:
            self.entries[tag] = TensorEntry(tag, dtype, () if dims == [0] else tuple(dims), [(start + offset, n)])
        self._last = tag

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        """The tensor as numpy; bfloat16 is widened to float32 exactly, as MindSpore's resharding does."""
        entry = self.entries[name]
        raw = np.empty(entry.nbytes, np.uint8)
        view = memoryview(raw)
        with open(self.path, "rb") as f:
            done = 0
            for offset, n in entry.chunks:
                f.seek(offset)
                if f.readinto(view[done:done + n]) != n:
                    raise UserError(f"{self.path} is truncated inside tensor {name}")
                done += n
        data = raw.view(_NP_TYPES[entry.dtype]).reshape(entry.dims)
        if entry.dtype == "BFloat16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data
