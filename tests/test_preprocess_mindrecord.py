"""The MindRecord writer: all-or-nothing files, a layout that fits the rows, and the batch path equal to FileWriter's."""

import numpy as np
import pytest

from qwenbuild.data.mindrecord import COLUMNS, layout, shard_files, write_mindrecord
from qwenbuild.errors import UserError


def batches(sizes=(100, 101, 7), length=65, seed=0):
    rng = np.random.default_rng(seed)
    for n in sizes:
        ids = rng.integers(0, 1000, (n, length), dtype=np.int32)
        yield {"input_ids": ids, "target_ids": np.where(ids > 900, -100, ids).astype(np.int32),
               "attention_mask": (ids <= 900).astype(np.int32)}


def read_back(path):
    import mindspore.dataset as ds

    rows = list(ds.MindDataset(str(path), columns_list=list(COLUMNS), shuffle=False)
                .create_dict_iterator(output_numpy=True))
    return {c: np.stack([r[c] for r in rows]) for c in COLUMNS}


def test_batch_path_writes_the_same_bytes_as_filewriter(tmp_path):
    fast = write_mindrecord(tmp_path / "fast" / "d.mindrecord", batches(), 65, 1000)[0]
    public = write_mindrecord(tmp_path / "public" / "d.mindrecord", batches(), 65, 1000, fast=False)[0]
    assert fast.read_bytes() == public.read_bytes()
    assert (fast.parent / "d.mindrecord.db").read_bytes() == (public.parent / "d.mindrecord.db").read_bytes()
    got, expected = read_back(fast), {c: np.concatenate([b[c] for b in batches()]) for c in COLUMNS}
    for c in COLUMNS:
        np.testing.assert_array_equal(got[c], expected[c])


def test_small_files_stay_small_and_large_ones_get_room():
    assert layout(129, 10) == (1 << 17, 1 << 17)
    page, header = layout(2049, 52_000)
    assert page == 1 << 21 and header == 1 << 20
    page, header = layout(2049, 10_000_000)
    assert header <= 1 << 27


def test_many_pages_fit_the_header(tmp_path):
    out = write_mindrecord(tmp_path / "d.mindrecord", batches(sizes=(500,) * 8, length=257), 257, 4000)[0]
    assert len(read_back(out)["input_ids"]) == 4000
    assert out.stat().st_size < 12 << 20


def test_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "d.mindrecord"
    out.write_bytes(b"old")

    def broken():
        yield from batches(sizes=(10,))
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        write_mindrecord(out, broken(), 65, 100)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mindrecord"]
    with pytest.raises(UserError, match="no rows"):
        write_mindrecord(out, iter([]), 65, 100)
    with pytest.raises(UserError, match="is a directory"):
        write_mindrecord(tmp_path, batches(), 65, 100)


def test_shard_names():
    assert [p.name for p in shard_files("x/d.mindrecord", 1)] == ["d.mindrecord"]
    assert [p.name for p in shard_files("x/d.mindrecord", 3)] == ["d.mindrecord0", "d.mindrecord1", "d.mindrecord2"]
