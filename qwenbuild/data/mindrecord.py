"""Writing token rows as MindRecord files, all-or-nothing, with a page size that suits the row length."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from qwenbuild.data.mindrecord_format import EncodedRows, MindRecordWriter, encode_rows
from qwenbuild.errors import UserError
from qwenbuild.store import output_path, promote, sweep_stale, tmp_sibling

COLUMNS = ("input_ids", "target_ids", "attention_mask")
SCHEMA = {name: {"type": "int32", "shape": [-1]} for name in COLUMNS}
DESCRIPTION = "qwenbuild preprocess"
_MIN_PAGE, _MAX_PAGE = 1 << 15, 1 << 28
_MIN_HEADER, _MAX_HEADER = 1 << 16, 1 << 27
_ROWS_PER_PAGE = 64
_HEADER_BYTES_PER_PAGE = 512  # measured need is under 300 bytes per page; the header is padded to its full size


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def page_sizes(row_length: int, max_rows: int, shards: int = 1) -> tuple[int, int]:
    """(page size, header size) for at most max_rows rows: small files stay small instead of 48 MiB of padding."""
    row_bytes = len(COLUMNS) * 4 * row_length
    page = min(max(_MIN_PAGE, _pow2_at_least(_ROWS_PER_PAGE * row_bytes)), _MAX_PAGE)
    while True:
        # raw and blob pages, each uncompressed (an upper bound), plus a partial pair per shard
        pages = 2 * (-(-max_rows * row_bytes // page)) + 2 * shards
        header = max(_MIN_HEADER, _pow2_at_least(_MIN_HEADER + _HEADER_BYTES_PER_PAGE * pages))
        if header <= _MAX_HEADER or page == _MAX_PAGE:
            return page, min(header, _MAX_HEADER)
        page *= 2


def shard_files(output_file: str | os.PathLike, file_partition: int) -> list[Path]:
    """Data files MindRecord writes: the name itself, or name0..nameK-1 for K shards (each with a .db index)."""
    output_file = Path(output_file)
    if file_partition == 1:
        return [output_file]
    return [output_file.with_name(f"{output_file.name}{i}") for i in range(file_partition)]


@contextlib.contextmanager
def _staging_dir(output_file: Path) -> Iterator[Path]:
    # MindRecord stores each file's own name inside it, so files are staged under their final names; the staging
    # dir is named like every temporary, so a later run sweeps one a killed run left
    output_file.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(output_file)
    staging = tmp_sibling(output_file, "tmp")
    try:
        staging.mkdir()  # inside the try: a signal handled just after mkdir returns must still remove it
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _public_write(writer, batch: dict[str, np.ndarray]) -> None:
    rows = [{name: batch[name][i] for name in COLUMNS} for i in range(len(batch[COLUMNS[0]]))]
    writer.write_raw_data(rows)


@contextlib.contextmanager
def _writer_errors(output_file: Path) -> Iterator[None]:
    """MindSpore's writer reports a full disk as a RuntimeError holding a multi-page report: keep its one line."""
    try:
        yield
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("[ERROR]")]
        if not lines and "MindRecord" not in str(exc):
            raise  # not the writer's: an error of the rows being written, for the caller to report
        raise UserError(f"MindRecord could not write {output_file}: {lines[0] if lines else exc}; "
                        "nothing was changed there",
                        hint="the disk may be full or a file-size limit reached: free space or write elsewhere, "
                             "then run again") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UserError(f"no space left while writing {output_file} ({exc.strerror}); nothing was changed there",
                        hint="free disk space or point the output elsewhere, then run again") from None


def write_mindrecord(output_file: str | os.PathLike, batches: Iterable[dict[str, np.ndarray] | EncodedRows],
                     row_length: int, max_rows: int, file_partition: int = 1, fast: bool = True,
                     inputs=()) -> list[Path]:
    """Write batches (2-D int32 arrays per column, or rows already encoded in worker processes) and promote every
    file only when all are complete.

    max_rows bounds the row count (the input's line count will do); it sizes the header, which must hold every page.
    fast=False writes through MindSpore's FileWriter instead (same bytes for one shard; the tests compare them).
    inputs: the files the rows come from, which no output file may be.
    """
    output_file = Path(output_file)
    if output_file.is_dir():
        raise UserError(f"output file {output_file} is a directory", hint="give a file name such as data.mindrecord")
    finals = shard_files(output_file, file_partition)
    for final in finals:
        for suffix in ("", ".db"):
            output_path(final.with_name(final.name + suffix), inputs=inputs)
    page, header = page_sizes(row_length, max_rows, file_partition)
    with _staging_dir(output_file) as staging, _writer_errors(output_file):
        staged = [staging / final.name for final in finals]
        writer = (MindRecordWriter(staged, list(COLUMNS), DESCRIPTION, page, header) if fast
                  else _FileWriter(staging / output_file.name, file_partition, page, header))
        try:
            wrote = 0
            for batch in batches:
                rows = batch if isinstance(batch, EncodedRows) or not fast else encode_rows(batch)
                count = len(rows) if isinstance(rows, EncodedRows) else len(rows[COLUMNS[0]])
                if count:
                    writer.write(rows)
                    wrote += count
            if wrote == 0:
                raise UserError("no rows to write", hint="the input has no conversations")
            writer.commit()
        finally:
            writer.close()
        for final in finals:
            for suffix in ("", ".db"):
                promote(staging / (final.name + suffix), final.with_name(final.name + suffix))
    return finals


class _FileWriter:
    """MindSpore's own writer behind the same three calls as MindRecordWriter."""

    def __init__(self, path: Path, shards: int, page: int, header: int):
        # mindspore takes seconds to load: imported only when this runs
        from mindspore.mindrecord import FileWriter

        self.writer = FileWriter(file_name=str(path), shard_num=shards, overwrite=True)
        self.writer.set_page_size(page)
        self.writer.set_header_size(header)
        self.writer.add_schema(SCHEMA, DESCRIPTION)

    def write(self, batch: dict[str, np.ndarray]) -> None:
        _public_write(self.writer, batch)

    def commit(self) -> None:
        self.writer.commit()

    def close(self) -> None:
        pass
