"""MindRecord data files for rows of int32 arrays, written directly: the bytes MindSpore's FileWriter writes for the
same sequence of write calls, at a fraction of its cost, with the row encoding free to run in worker processes.

A data file is a header (8-byte little-endian length, then JSON, zero-padded to header_size) and fixed-size page
slots after it. Blob pages hold one record per row (8-byte little-endian length, then each field as an 8-byte
big-endian length and the array with every value narrowed to 1, 2 or 4 bytes). Raw pages hold each row's scalar
fields; with none in the schema, MindRecord stores the msgpack placeholder {"id": 0}. The .db index beside each file
is made by MindSpore's own index generator from the finished data files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

# msgpack of {"id": 0}, after its 8-byte length: the raw record of a row whose fields are all blobs
_RAW_RECORD = (5).to_bytes(8, "little") + bytes([0x81, 0xA2, 0x69, 0x64, 0x00])
_RAW_SIZE = len(_RAW_RECORD)
_BLOB, _RAW = "BLOB_DATA", "RAW_DATA"


@dataclasses.dataclass
class EncodedRows:
    """Rows ready for blob pages: `data` holds every row's record back to back, `sizes` each record's length."""

    data: np.ndarray  # uint8
    sizes: np.ndarray  # int64
    saved: int  # bytes the narrowing saved, summed into the header's compression_size

    def __len__(self) -> int:
        return len(self.sizes)

    def slice(self, start: int, stop: int) -> "EncodedRows":
        offsets = self.offsets()
        return EncodedRows(self.data[offsets[start]:offsets[stop]], self.sizes[start:stop], 0)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)])


def _big_endian(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8: each value as a big-endian unsigned integer of `width` bytes."""
    return values.astype(f">u{width}").view(np.uint8).reshape(len(values), width)


def encode_rows(columns: dict[str, np.ndarray]) -> EncodedRows:
    """Blob records of rows given as 2-D int32 arrays (rows x values), one per field (two fields or more).

    Fields go in name order, as MindRecord sorts them. Each value keeps the fewest bytes (1, 2 or 4) that hold it,
    with a 2-bit code per value (most significant bits first) saying which.
    """
    names = sorted(columns)
    if len(names) < 2:
        raise ValueError("encode_rows needs two fields or more (MindRecord stores a single field differently)")
    n = len(columns[names[0]])
    record = np.zeros(n, np.int64)
    fields = []
    for name in names:
        values = np.ascontiguousarray(columns[name], dtype=np.int32)
        if values.ndim != 2 or len(values) != n:
            raise ValueError(f"field {name}: expected a 2-D array of {n} rows, found shape {values.shape}")
        field = _Narrowed(values)
        fields.append(field)
        record += field.head.shape[1] + field.lengths
    prefix = record.astype("<u8").view(np.uint8).reshape(n, 8)
    pieces = []
    for i in range(n):
        pieces.append(prefix[i])
        for field in fields:
            pieces += field.row(i)
    uncompressed = sum(8 + 4 * columns[name].shape[1] for name in names)
    data = np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
    return EncodedRows(data, record + 8, int(n * uncompressed - record.sum()))


# which bytes of a little-endian int32 a value keeps, by its width code: the low 1, 2 or all 4
_KEPT_BYTES = np.array([0x00000001, 0x00000101, 0x01010101], "<u4")


def _width_codes(values: np.ndarray) -> np.ndarray:
    """0, 1 or 2 per value: it fits in 1, 2 or 4 bytes."""
    code = ((values < -128) | (values > 127)).astype(np.uint8)
    code += (values < -32768) | (values > 32767)
    return code


def _ragged(lengths: np.ndarray, stride: int) -> np.ndarray:
    """Flat indices of the first lengths[i] elements of every row i of a [len(lengths), stride] array."""
    total = int(lengths.sum())
    starts = np.repeat(np.arange(len(lengths), dtype=np.int64) * stride - (np.cumsum(lengths) - lengths), lengths)
    return starts + np.arange(total, dtype=np.int64)


class _Narrowed:
    """One field of every row narrowed. A row's trailing run of one value (its padding) is one pattern repeated,
    so only the values before it are looked at one by one: one pass compares every value with the row's last."""

    def __init__(self, values: np.ndarray):
        n, count = values.shape
        self.count, self.patterns = count, {}
        self.last = values[:, -1] if count else np.zeros(n, np.int32)
        differs = values != self.last[:, None]
        self.run = np.where(differs.any(axis=1), np.argmax(differs[:, ::-1], axis=1), count) if count \
            else np.zeros(n, np.int64)
        before = count - self.run  # values ahead of the run, each narrowed on its own
        body = values.reshape(-1)[_ragged(before, count)]
        code = _width_codes(body)
        last_code = _width_codes(self.last)
        self.width = np.left_shift(1, last_code, dtype=np.int64)
        ends = np.cumsum(before)
        summed = np.concatenate([[0], np.cumsum(np.left_shift(1, code, dtype=np.int64))])
        body_bytes = summed[ends] - summed[ends - before]
        self.lengths = body_bytes + self.run * self.width
        # the bitmap holds a code per value (2 bits, most significant first), zeros after the last value
        bitmap_len = -(-count // 4)
        codes = np.zeros((n, bitmap_len * 4), np.uint8)
        codes[:, :count] = last_code[:, None]
        codes.reshape(-1)[_ragged(before, bitmap_len * 4)] = code
        codes = codes.reshape(n, bitmap_len, 4)
        bitmap = (codes[..., 0] << 6) | (codes[..., 1] << 4) | (codes[..., 2] << 2) | codes[..., 3]
        self.head = np.concatenate([_big_endian(4 + bitmap_len + self.lengths, 8),
                                    _big_endian(np.full(n, count, np.int64), 4), bitmap], axis=1)
        self.body = body.view(np.uint8).reshape(-1, 4)[_KEPT_BYTES[code].view(bool).reshape(-1, 4)]
        self.offsets = np.concatenate([[0], np.cumsum(body_bytes)])

    def _repeated(self, value: int, width: int) -> np.ndarray:
        if value not in self.patterns:
            self.patterns[value] = np.tile(np.array([value], "<i4").view(np.uint8)[:width], self.count)
        return self.patterns[value]

    def row(self, i: int) -> list[np.ndarray]:
        run, width = int(self.run[i]), int(self.width[i])
        return [self.head[i], self.body[self.offsets[i]:self.offsets[i + 1]],
                self._repeated(int(self.last[i]), width)[:run * width]]


@dataclasses.dataclass
class _Page:
    id: int
    type: str
    type_id: int
    start_row: int
    end_row: int
    groups: list[tuple[int, int]]  # (row group id, offset in the page)
    size: int

    def header(self, shard_id: int) -> dict:
        groups = self.groups or [(0, 0)]
        return {"end_row_id": self.end_row, "page_id": self.id, "page_size": self.size, "page_type": self.type,
                "page_type_id": self.type_id, "row_group_ids": [{"id": g, "offset": o} for g, o in groups],
                "shard_id": shard_id, "start_row_id": self.start_row}


class _ShardFile:
    """One data file: rows are cut into page-sized groups and placed exactly as MindRecord's writer places them."""

    def __init__(self, path: Path, shard_id: int, page_size: int, header_size: int):
        self.path, self.shard_id, self.page_size, self.header_size = path, shard_id, page_size, header_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.pages: list[_Page] = []
        self.last_blob: _Page | None = None
        self.last_raw: _Page | None = None

    def _put(self, page: _Page, offset: int, data) -> None:
        self._pwrite(self.header_size + page.id * self.page_size + offset, data)

    def _pwrite(self, position: int, data) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def _new_page(self, *args) -> _Page:
        page = _Page(self.pages[-1].id + 1 if self.pages else 0, *args)
        self.pages.append(page)
        return page

    def _cut(self, sizes: np.ndarray) -> list[tuple[int, int]]:
        """Row ranges per blob page: the first continues the last page (possibly empty), each next starts one."""
        blob = self.last_blob.size if self.last_blob else 0
        raw = self.last_raw.size - self.last_raw.groups[-1][1] if self.last_raw and self.last_raw.groups else 0
        groups, start = [], 0
        for i, size in enumerate(sizes.tolist()):
            if size > self.page_size:
                raise ValueError(f"a row of {size:,} bytes does not fit a MindRecord page of {self.page_size:,}")
            if blob == 0 or blob + size > self.page_size or raw + _RAW_SIZE > self.page_size:
                groups.append((start, i))
                start, blob, raw = i, size, _RAW_SIZE
            else:
                blob, raw = blob + size, raw + _RAW_SIZE
        groups.append((start, len(sizes)))
        return groups

    def write(self, rows: EncodedRows) -> None:
        if not len(rows):
            return
        groups, offsets = self._cut(rows.sizes), rows.offsets()
        first_start, first_stop = groups[0]
        if first_stop > first_start:
            page = self.last_blob
            self._put(page, page.size, rows.data[offsets[first_start]:offsets[first_stop]])
            page.size += int(offsets[first_stop] - offsets[first_start])
            page.end_row += first_stop - first_start
        for start, stop in groups[1:]:
            type_id = self.last_blob.type_id + 1 if self.last_blob else 0
            row = self.last_blob.end_row if self.last_blob else 0
            page = self._new_page(_BLOB, type_id, row, row + stop - start, [], int(offsets[stop] - offsets[start]))
            self._put(page, 0, rows.data[offsets[start]:offsets[stop]])
            self.last_blob = page
        if first_stop > first_start:
            self._shift_raw((first_stop - first_start) * _RAW_SIZE)
        self._write_raw(groups)

    def _shift_raw(self, incoming: int) -> None:
        """Rows continuing a blob page keep their raw records in one group: move that group to a fresh raw page."""
        old = self.last_raw
        if old.size + incoming <= self.page_size:
            return
        if len(old.groups) < 2:
            raise ValueError("MindRecord raw page too small for one row group; use a larger page size")
        offset = old.groups[-1][1]
        moved = os.pread(self.fd, old.size - offset, self.header_size + old.id * self.page_size + offset)
        old.size = offset
        old.groups.pop()
        page = self._new_page(_RAW, old.id + 1, 0, 0, [(old.groups[-1][0] + 1, 0)], len(moved))
        self._put(page, 0, moved)
        self.last_raw = page

    def _write_raw(self, groups: list[tuple[int, int]]) -> None:
        last_group = self.last_raw.groups[-1][0] if self.last_raw and self.last_raw.groups else -1
        for i, (start, stop) in enumerate(groups):
            if stop == start:
                continue
            size = (stop - start) * _RAW_SIZE
            if self.last_raw is None or self.last_raw.size + size > self.page_size:
                type_id = self.last_raw.id + 1 if self.last_raw else 0
                self.last_raw = self._new_page(_RAW, type_id, 0, 0, [], 0)
            page = self.last_raw
            if i > 0:
                last_group += 1
                page.groups.append((last_group, page.size))
            self._put(page, page.size, _RAW_RECORD * (stop - start))
            page.size += size

    def finish(self, header: dict) -> None:
        text = json.dumps({**header, "page": [p.header(self.shard_id) for p in self.pages]},
                          separators=(",", ":")).encode()
        if 8 + len(text) > self.header_size:
            raise ValueError(f"MindRecord header of {len(text):,} bytes exceeds its size of {self.header_size:,}")
        self._pwrite(0, len(text).to_bytes(8, "little") + text)
        os.close(self.fd)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def load_index_generator():
    """MindSpore's index generator class. Importing it takes seconds of CPU: a caller that waits on other processes
    can load it meanwhile, so that commit() does not wait for it at the end."""
    # mindspore takes seconds to load: imported only when an index is written
    from mindspore.mindrecord.core.shardindexgenerator import ShardIndexGenerator

    return ShardIndexGenerator


class MindRecordWriter:
    """Writes EncodedRows into `paths` (one data file per shard, names as MindRecord gives them), then the header
    and the .db index of each. A batch is spread over the shards in contiguous, equal parts (the first shards take
    the remainder), so the files depend only on the rows and the batches."""

    def __init__(self, paths: list[Path], fields: list[str], description: str, page_size: int, header_size: int):
        self.paths = [Path(p) for p in paths]
        self.fields = sorted(fields)
        self.description, self.page_size, self.header_size = description, page_size, header_size
        self.saved = 0
        self.shards = []
        try:
            for i, path in enumerate(self.paths):
                self.shards.append(_ShardFile(path, i, page_size, header_size))
        except BaseException:
            self.close()
            raise

    def write(self, rows: EncodedRows) -> None:
        self.saved += rows.saved
        count = len(self.shards)
        share, extra = divmod(len(rows), count)
        start = 0
        for i, shard in enumerate(self.shards):
            stop = start + share + (1 if i < extra else 0)
            shard.write(rows if count == 1 else rows.slice(start, stop))
            start = stop

    def commit(self) -> None:
        schema = {name: {"shape": [-1], "type": "int32"} for name in self.fields}
        header = {"header_size": self.header_size, "index_fields": None, "page": None, "page_size": self.page_size,
                  "compression_size": max(self.saved, 0),  # MindRecord records no negative saving
                  "schema": [{"blob_fields": self.fields, "desc": self.description, "schema": schema}],
                  "shard_addresses": [p.name for p in self.paths], "shard_id": 0, "statistics": None,
                  "version": "3.0"}
        for shard in self.shards:
            shard.finish({**header, "shard_id": shard.shard_id})
        self.shards = []
        index = load_index_generator()(os.path.realpath(self.paths[0]), False)
        index.build()
        index.write_to_db()

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards = []
