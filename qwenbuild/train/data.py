"""Which MindRecord rows each rank trains on at each step: a pure function of (seed, step), so a resume replays it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import numpy as np

from qwenbuild.errors import UserError

COLUMNS = ["input_ids", "target_ids"]


@functools.lru_cache(maxsize=2)
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row order of one epoch, drawn from (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return num_rows // global_batch


def rank_rows(num_rows: int, global_batch: int, seed: int, step: int, rank: int, batch_size: int) -> np.ndarray:
    """Rows of `rank`'s slice of the global batch trained at `step`; the global batch does not depend on ranks."""
    per_epoch = steps_per_epoch(num_rows, global_batch)
    epoch, index = divmod(step, per_epoch)
    start = index * global_batch + rank * batch_size
    return epoch_order(num_rows, seed, epoch)[start:start + batch_size]


def rank_rows_by_epoch(num_rows: int, global_batch: int, seed: int, first_step: int, total_steps: int, rank: int,
                  batch_size: int) -> list[list[int]]:
    """Rows `rank` reads for steps first_step .. total_steps - 1, one list per epoch (rows never repeat in one)."""
    per_epoch = steps_per_epoch(num_rows, global_batch)
    by_epoch: dict[int, list[int]] = {}
    for step in range(first_step, total_steps):
        rows = rank_rows(num_rows, global_batch, seed, step, rank, batch_size)
        by_epoch.setdefault(step // per_epoch, []).extend(int(r) for r in rows)
    return list(by_epoch.values())


def check_mindrecord(mindrecord: str | Path, seq_length: int) -> int:
    """Number of rows; refuses a file whose rows are not seq_length + 1 long or that lacks the training columns."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore.dataset as ds

    path = Path(mindrecord)
    if not path.is_file() or not Path(str(path) + ".db").is_file():
        raise UserError(f"{path}: MindRecord file or its .db index does not exist",
                        hint="build the dataset first (qwen1_5_preprocess / doit data)")
    try:
        dataset = ds.MindDataset(str(path), columns_list=COLUMNS, shuffle=False)
        first = next(dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))
    except (RuntimeError, StopIteration) as exc:
        raise UserError(f"{path}: cannot read columns {COLUMNS} from the MindRecord: {exc}".splitlines()[0]) from exc
    length = first[0].shape[-1]
    if length != seq_length + 1:
        raise UserError(f"{path}: rows hold {length} tokens but seq_length is {seq_length} (rows must be "
                        f"seq_length + 1 = {seq_length + 1})",
                        hint="preprocess with the same --seq_length as training")
    return dataset.get_dataset_size()


def batches(mindrecord: str | Path, rows_by_epoch: list[list[int]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, target_ids) int32 batches of the chosen rows, in order, read with MindDataset."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore.dataset as ds

    for rows in rows_by_epoch:
        # a subset sampler over a MindRecord takes at most one epoch of indices: one dataset per epoch
        dataset = ds.MindDataset(str(mindrecord), columns_list=COLUMNS, sampler=ds.SubsetSampler(rows))
        for a, b in dataset.batch(batch_size, drop_remainder=True).create_tuple_iterator(output_numpy=True,
                                                                                         num_epochs=1):
            yield a.astype(np.int32), b.astype(np.int32)
