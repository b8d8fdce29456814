"""MindSpore .ckpt files (protobuf `Checkpoint`) written and read entry by entry, without holding the model.

A .ckpt is a concatenation of serialized one-entry `Checkpoint` messages; MindSpore's own writer splits a tensor
into entries of at most SLICE_BYTES of content, each repeating the name, dims and type. Writing the same entries
here gives the bytes `mindspore.save_checkpoint(..., crc_check=True)` gives for the same list of tensors: the
entries, then a trailer b"crc_num" + the CRC32 of every byte before it (10 bytes, big-endian). Reading checks that
CRC whenever a file carries one; files saved without it (MindSpore's default) are read unchecked.
"""

from __future__ import annotations

import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from qwenbuild import dtypes
from qwenbuild.errors import UserError

SLICE_BYTES = 512 << 20
CRC_MARK = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_MARK) + 10
CRC_READ_BYTES = 16 << 20
DAMAGED_HINT = "rebuild the checkpoint or copy it again from a good source"
NUMPY_TYPES = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
               "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
               "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_, "BFloat16": np.uint16}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def entry_header(name: str, shape, dtype: str, content_bytes: int, type_name: str | None = None) -> bytes:
    """Bytes of one `Checkpoint` entry up to (not including) its tensor_content; type_name overrides MindSpore's
    name for `dtype` (e.g. "str")."""
    dims = b"".join(_varint(1 << 3) + _varint(d) for d in shape)
    kind = type_name or dtypes.MINDSPORE[dtype]
    tensor_head = dims + _field(2, kind.encode()) + _varint(3 << 3 | 2) + _varint(content_bytes)
    tensor_len = len(tensor_head) + content_bytes
    value_head = _field(1, name.encode()) + _varint(2 << 3 | 2) + _varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return _varint(1 << 3 | 2) + _varint(value_len) + value_head + tensor_head


def write_tensor(f: BinaryIO, name: str, shape, dtype: str, chunks: Iterable[bytes], nbytes: int,
                 slice_bytes: int = SLICE_BYTES) -> None:
    """Append one tensor, streaming its bytes, split into entries of `slice_bytes` like MindSpore does."""
    pending, written = b"", 0
    chunk_iter = iter(chunks)
    for start in range(0, nbytes, slice_bytes):
        size = min(slice_bytes, nbytes - start)
        f.write(entry_header(name, shape, dtype, size))
        left = size
        while left:
            if not pending:
                pending = next(chunk_iter, b"")
                if not pending:
                    raise RuntimeError(f"tensor {name}: source ended after {written} of {nbytes} bytes")
            piece, pending = pending[:left], pending[left:]
            f.write(piece)
            left -= len(piece)
            written += len(piece)


@dataclass(frozen=True)
class CkptSlice:
    """One entry of a .ckpt file: a whole tensor or one slice of it."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # MindSpore's name, e.g. BFloat16
    offset: int  # absolute offset of the content bytes
    nbytes: int


def _read_varint(f: BinaryIO, where: str) -> int:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            raise UserError(f"{where} ends in the middle of an entry: the checkpoint is truncated")
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7


def _parse_fields(f: BinaryIO, end: int, where: str, keep_bytes: set[int]) -> dict:
    """Fields of a message ending at `end`: lists of ints, bytes, or (offset, length) for fields in keep_bytes."""
    fields: dict = {}
    while f.tell() < end:
        key = _read_varint(f, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.setdefault(number, []).append(_read_varint(f, where))
        elif wire == 2:
            length = _read_varint(f, where)
            if number in keep_bytes:
                fields.setdefault(number, []).append(f.read(length))
            else:
                fields.setdefault(number, []).append((f.tell(), length))
                f.seek(length, os.SEEK_CUR)
        else:
            raise UserError(f"{where} is not a readable MindSpore checkpoint (protobuf wire type {wire})")
    return fields


def read_index(path: str | os.PathLike) -> list[CkptSlice]:
    """Every entry of a .ckpt file, in file order, with where its content lies; contents are not read."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes): not a MindSpore checkpoint",
                        hint="pass a checkpoint written by mindspore.save_checkpoint")
    try:
        verify_crc(path)
        with open(path, "rb") as f:
            end = size - CRC_TRAILER_BYTES if _stored_crc(f, size) is not None else size
            return _read_entries(f, path, end)
    except (KeyError, IndexError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable MindSpore checkpoint (damaged entry: {exc!r})",
                        hint="pass an unencrypted .ckpt written by mindspore.save_checkpoint") from None


def _read_entries(f: BinaryIO, path: Path, size: int) -> list[CkptSlice]:
    """Entries of the first `size` bytes (the whole file but its CRC trailer)."""
    f.seek(0)
    slices = []
    while f.tell() < size:
        at = f.tell()
        first = f.read(1)
        if first != b"\x0a":
            if first == CRC_MARK[:1] and f.read(len(CRC_MARK) - 1) == CRC_MARK[1:]:
                raise UserError(f"{path} is truncated: its CRC trailer at offset {at} is incomplete",
                                hint=DAMAGED_HINT)
            raise UserError(f"{path} is not a readable MindSpore checkpoint (unexpected byte at offset {at}); "
                            "encrypted checkpoints are not supported")
        length = _read_varint(f, str(path))
        end = f.tell() + length
        if end > size:
            raise UserError(f"{path} is truncated: an entry at offset {at} needs {end} bytes, the file has {size}")
        value = _parse_fields(f, end, str(path), keep_bytes={1})
        if 2 not in value:
            raise UserError(f"{path}: entry {value.get(1, [b'?'])[0].decode(errors='replace')} is not a dense "
                            "tensor (map parameters are not supported)")
        t_off, t_len = value[2][0]
        resume = f.tell()
        f.seek(t_off)
        tensor = _parse_fields(f, t_off + t_len, str(path), keep_bytes={2})
        f.seek(resume)
        content_off, content_len = tensor[3][0]
        dims = tuple(tensor.get(1, []))
        # MindSpore writes a scalar's dims as [0]
        slices.append(CkptSlice(value[1][0].decode(), () if dims == (0,) else dims, tensor[2][0].decode(),
                                content_off, content_len))
    return slices


def _stored_crc(f: BinaryIO, size: int) -> int | None:
    """The CRC32 a file's trailer records, or None when it has no trailer."""
    if size < CRC_TRAILER_BYTES:
        return None
    f.seek(size - CRC_TRAILER_BYTES)
    trailer = f.read(CRC_TRAILER_BYTES)
    if not trailer.startswith(CRC_MARK):
        return None
    return int.from_bytes(trailer[len(CRC_MARK):], "big")


def has_crc(path: str | os.PathLike) -> bool:
    """Whether a .ckpt ends in the CRC trailer save_checkpoint(..., crc_check=True) writes."""
    with open(path, "rb") as f:
        return _stored_crc(f, os.fstat(f.fileno()).st_size) is not None


def _computed_crc(f: BinaryIO, nbytes: int, path: Path) -> int:
    """CRC32 of the first `nbytes`, read in chunks so a multi-GB file never sits in memory."""
    buffer = memoryview(bytearray(min(CRC_READ_BYTES, max(nbytes, 1))))
    crc, left = 0, nbytes
    f.seek(0)
    while left:
        got = f.readinto(buffer[:min(len(buffer), left)])
        if not got:
            raise UserError(f"{path} shrank while it was read ({left} bytes missing)",
                            hint="wait until whatever writes it has finished")
        crc = binascii.crc32(buffer[:got], crc)
        left -= got
    return crc


# (resolved path, size, mtime_ns) of files whose CRC matched: the index of a file may be read several times
_CRC_MATCHED: set[tuple[str, int, int]] = set()


def verify_crc(path: str | os.PathLike) -> None:
    """Check a .ckpt's CRC trailer against its content, reading it in chunks; no-op for a file without one."""
    path = Path(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _CRC_MATCHED:
            return
        stored = _stored_crc(f, st.st_size)
        if stored is None:
            return
        computed = _computed_crc(f, st.st_size - CRC_TRAILER_BYTES, path)
    if computed != stored:
        raise UserError(f"{path} is damaged: its CRC32 does not match its content (stored {stored}, computed "
                        f"{computed})", hint=DAMAGED_HINT)
    _CRC_MATCHED.add(key)


def load_with_crc(path: str | os.PathLike, fmt: str = "ckpt") -> dict:
    """mindspore.load_checkpoint, checking the CRC of a .ckpt that carries one; failures name the file."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    check = fmt == "ckpt" and has_crc(path)
    try:
        return ms.load_checkpoint(str(path), format=fmt, crc_check=check)
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        if check:
            verify_crc(path)  # says "damaged" where MindSpore only guesses at permissions
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable MindSpore {fmt} checkpoint: {reason}") from None


def load_weights(net, ckpt_path) -> None:
    """Load a MindSpore checkpoint (.ckpt or .safetensors) into a QwenForCausalLM strictly, its CRC checked."""
    # the network loads mindspore (seconds): imported only when this runs
    from qwenbuild.model.network import set_weights

    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", hint="convert one with `qwenbuild convert_weight`")
    set_weights(net, load_with_crc(path, "safetensors" if path.suffix == ".safetensors" else "ckpt"), path)


@dataclass(frozen=True)
class CkptTensor:
    """A tensor of a .ckpt file, whose bytes may be spread over consecutive slices."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    path: Path
    parts: tuple[tuple[int, int], ...]  # (offset, nbytes)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.parts)

    def chunks(self, chunk_bytes: int = 64 << 20) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for offset, nbytes in self.parts:
                f.seek(offset)
                left = nbytes
                while left:
                    data = f.read(min(chunk_bytes, left))
                    if not data:
                        raise UserError(f"{self.path} is truncated inside tensor {self.name}")
                    left -= len(data)
                    yield data


def read_tensors(path: str | os.PathLike) -> list[CkptTensor]:
    """Tensors of a .ckpt file in file order, slices of one tensor joined."""
    path = Path(path)
    tensors: dict[str, CkptTensor] = {}
    for s in read_index(path):
        old = tensors.get(s.name)
        if old is None:
            tensors[s.name] = CkptTensor(s.name, s.shape, s.type_name, path, ((s.offset, s.nbytes),))
        elif old.shape == s.shape and old.type_name == s.type_name:
            tensors[s.name] = CkptTensor(s.name, s.shape, s.type_name, path, old.parts + ((s.offset, s.nbytes),))
        else:
            raise UserError(f"{path}: tensor {s.name} appears twice with different shapes or types")
    return list(tensors.values())


def read_array(tensor: CkptTensor) -> np.ndarray:
    """A tensor's values as numpy; bfloat16 is widened to float32 exactly, as MindSpore's resharding does."""
    if tensor.type_name not in NUMPY_TYPES:
        raise UserError(f"{tensor.path}: tensor {tensor.name!r} has type {tensor.type_name!r}, which cannot be read "
                        "as numpy")
    raw = np.empty(tensor.nbytes, np.uint8)
    done = 0
    for chunk in tensor.chunks():
        raw[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
        done += len(chunk)
    data = raw.view(NUMPY_TYPES[tensor.type_name]).reshape(tensor.shape)
    if tensor.type_name == dtypes.MINDSPORE["bfloat16"]:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data


def text_entry(name: str, text: str) -> bytes:
    """A string entry as save_checkpoint's append_dict writes one: dims [0], type "str", UTF-32 content."""
    content = text.encode("utf-32-le")
    return entry_header(name, (0,), "", len(content), type_name="str") + content


def read_text(tensor: CkptTensor) -> str:
    if tensor.type_name != "str":
        raise UserError(f"{tensor.path}: entry {tensor.name!r} is a {tensor.type_name} tensor, not a string")
    return b"".join(tensor.chunks()).decode("utf-32-le")


class _CrcWriter:
    """A file being written that keeps the CRC32 of everything written to it, as MindSpore's crc_check does."""

    def __init__(self, f: BinaryIO):
        self.f, self.crc = f, 0

    def write(self, data) -> int:
        self.crc = binascii.crc32(data, self.crc)
        return self.f.write(data)

    def trailer(self) -> bytes:
        return CRC_MARK + self.crc.to_bytes(10, "big")


def write_checkpoint(path: str | os.PathLike, tensors: Iterable, progress: Callable | None = None,
                     texts: dict[str, str] | None = None) -> int:
    """Write tensors (objects with name, shape, dtype, nbytes, chunks()) and then `texts` (string entries, as
    save_checkpoint's append_dict) to a .ckpt ending in its CRC trailer; returns bytes written."""
    with open(path, "wb") as f:
        out = _CrcWriter(f)
        for t in tensors:
            write_tensor(out, t.name, t.shape, t.dtype, t.chunks(), t.nbytes)
            if progress:
                progress(t)
        for name, text in (texts or {}).items():
            out.write(text_entry(name, text))
        f.write(out.trailer())
        return f.tell()
