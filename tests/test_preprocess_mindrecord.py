"""The MindRecord writer: all-or-nothing files, a layout that fits the rows, and bytes equal to FileWriter's."""

import numpy as np
import pytest

from qwenbuild.data.mindrecord import COLUMNS, page_sizes, shard_files, write_mindrecord
from qwenbuild.data.mindrecord_format import _ShardFile, encode_rows
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


def edge_batches(sizes, length, seed):
    """Rows mixing every width MindRecord narrows to, around each boundary, with padding runs."""
    rng = np.random.default_rng(seed)
    edges = np.array([0, 1, -1, 127, 128, -128, -129, 32767, 32768, -32768, -32769, 151643, -100,
                      2**31 - 1, -2**31], np.int32)
    for n in sizes:
        ids = rng.choice(edges, (n, length)).astype(np.int32)
        ids[np.arange(length)[None, :] >= rng.integers(0, length + 1, (n, 1))] = 151643
        yield {"input_ids": ids, "target_ids": np.where(ids == 151643, -100, ids).astype(np.int32),
               "attention_mask": (ids != 151643).astype(np.int32)}


@pytest.mark.parametrize("sizes,length,seed", [((1, 2, 3), 1, 0), ((5, 7, 30, 1), 601, 1),
                                               ((90, 90, 2, 5, 90) * 12, 2, 3), ((1, 1, 1, 5, 2) * 300, 3, 2)])
def test_rows_of_every_width_and_page_shape_match_filewriter_byte_for_byte(tmp_path, monkeypatch, sizes, length,
                                                                           seed):
    moved, shift = [], _ShardFile._shift_raw

    def counting_shift(self, incoming):
        before = len(self.pages)
        shift(self, incoming)
        moved.append(len(self.pages) - before)
    monkeypatch.setattr(_ShardFile, "_shift_raw", counting_shift)
    ours = write_mindrecord(tmp_path / "ours" / "d.mindrecord", edge_batches(sizes, length, seed), length,
                            sum(sizes))[0]
    theirs = write_mindrecord(tmp_path / "theirs" / "d.mindrecord", edge_batches(sizes, length, seed), length,
                              sum(sizes), fast=False)[0]
    assert ours.read_bytes() == theirs.read_bytes()
    assert (ours.parent / "d.mindrecord.db").read_bytes() == (theirs.parent / "d.mindrecord.db").read_bytes()
    if len(sizes) > 50:
        # these fill a raw page in the middle of a row group, which MindRecord then moves to a new raw page
        assert sum(moved) > 0
    got = read_back(ours)
    for c in COLUMNS:
        np.testing.assert_array_equal(got[c], np.concatenate([b[c] for b in edge_batches(sizes, length, seed)]))


def test_encoding_narrows_each_value_to_the_fewest_bytes():
    rows = encode_rows({"a": np.array([[5, -129, 70000]], np.int32), "b": np.array([[-1]], np.int32)})
    # per field: 8-byte big-endian length, 4-byte count, 2 bits per value (1, 2 or 4 bytes), the narrowed values
    a = bytes([0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 3, 0b00011000, 5]) + (-129).to_bytes(2, "little", signed=True) + \
        (70000).to_bytes(4, "little")
    b = bytes([0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0xFF])
    assert rows.data.tobytes() == (len(a) + len(b)).to_bytes(8, "little") + a + b
    assert rows.sizes.tolist() == [8 + len(a) + len(b)]
    assert rows.saved == (8 + 12 + 8 + 4) - (len(a) + len(b)) == -2


def test_shards_are_the_same_bytes_every_run(tmp_path):
    runs = []
    for i in range(2):
        files = write_mindrecord(tmp_path / f"run{i}" / "d.mindrecord", edge_batches((40, 3, 17), 9, 5), 9, 60, 3)
        runs.append([(f.read_bytes(), f.with_name(f.name + ".db").read_bytes()) for f in files])
    assert runs[0] == runs[1]
    got = read_back(tmp_path / "run0" / "d.mindrecord0")
    expected = np.concatenate([b["input_ids"] for b in edge_batches((40, 3, 17), 9, 5)])
    assert sorted(map(tuple, got["input_ids"].tolist())) == sorted(map(tuple, expected.tolist()))


def test_small_files_stay_small_and_large_ones_get_room():
    assert page_sizes(129, 10) == (1 << 17, 1 << 17)
    page, header = page_sizes(2049, 52_000)
    assert page == 1 << 21 and header == 1 << 20
    page, header = page_sizes(2049, 10_000_000)
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


def test_a_killed_writers_staging_dir_is_swept_by_the_next_run(tmp_path):
    dead = 2**22 + 1  # above Linux's largest pid: no such process
    leftover = tmp_path / f".d.mindrecord.tmp-{dead}-0123abcd"
    leftover.mkdir()
    (leftover / "d.mindrecord").write_bytes(b"half")
    write_mindrecord(tmp_path / "d.mindrecord", batches(sizes=(3,)), 65, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mindrecord", "d.mindrecord.db"]
