"""Checkpoints qwenbuild writes end in MindSpore's CRC trailer, and a damaged one is refused wherever it is read."""

from __future__ import annotations

import binascii
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest

from hf_tiny import tiny_hf_model
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import parameter_shapes
from qwenbuild.parallel import reshard, strategy as st
from qwenbuild.train import checkpoint
from qwenbuild.weights import convert_weight, mindspore_ckpt
from qwenbuild.weights.mindspore_ckpt import has_crc, load_weights, load_with_crc, read_index, read_tensors, \
    write_checkpoint

QWENBUILD = Path(sys.executable).parent / "qwenbuild"
CFG = QwenConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=48)
TRAILER = 17  # b"crc_num" + 10-byte big-endian CRC32


def _tensor(name: str, array: np.ndarray, dtype: str, pieces: int = 3):
    """What write_checkpoint takes, its bytes handed over in several pieces as a streamed source does."""
    raw = array.tobytes()
    step = max(1, len(raw) // pieces)
    return SimpleNamespace(name=name, shape=array.shape, dtype=dtype, nbytes=len(raw),
                           chunks=lambda: [raw[i:i + step] for i in range(0, len(raw), step)])


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((5, 7)).astype(np.float32), "h": rng.standard_normal(9).astype(np.float16),
            "b": rng.standard_normal(3).astype(np.float32)}


KINDS = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def _flip_bit(src: Path, dst: Path | None = None) -> Path:
    """Flip one bit in the middle of the largest tensor's stored data, in place or into a copy."""
    largest = max(read_index(src), key=lambda s: s.nbytes)
    data = bytearray(src.read_bytes())
    data[largest.offset + largest.nbytes // 2] ^= 0x10
    dst = dst or src
    if dst.exists():
        os.chmod(dst, 0o644)  # MindSpore leaves its files read-only
    dst.write_bytes(bytes(data))
    return dst


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(QWENBUILD), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QWENBUILD_DEBUG": ""})


def _refused_as_damaged(run: subprocess.CompletedProcess, path: Path) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"{path} is damaged: its CRC32 does not match its content" in run.stderr, run.stderr


def test_trailer_bytes_equal_mindspore_for_the_same_tensors(tmp_path):
    arrays = _arrays()
    size = write_checkpoint(tmp_path / "q.ckpt", [_tensor(n, a, KINDS[a.dtype]) for n, a in arrays.items()],
                            texts={"note": "{\"a\": 1}"})
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in arrays.items()], str(tmp_path / "m.ckpt"),
                       append_dict={"note": "{\"a\": 1}"}, crc_check=True)
    ours, theirs = (tmp_path / "q.ckpt").read_bytes(), (tmp_path / "m.ckpt").read_bytes()
    assert size == len(ours)
    assert ours[-TRAILER:] == theirs[-TRAILER:]
    assert ours[-TRAILER:] == b"crc_num" + binascii.crc32(ours[:-TRAILER]).to_bytes(10, "big")
    assert ours == theirs


def test_mindspore_accepts_qwenbuild_files_with_crc_check(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    assert has_crc(tmp_path / "model.ckpt")
    checked = ms.load_checkpoint(str(tmp_path / "model.ckpt"), crc_check=True)
    for t in read_tensors(tmp_path / "model.ckpt"):
        if t.type_name != "str":
            np.testing.assert_array_equal(checked[t.name].asnumpy(), mindspore_ckpt.read_array(t), err_msg=t.name)
    assert set(load_with_crc(tmp_path / "model.ckpt")) == set(checked)


def test_flipped_bit_stops_convert_reversed_and_writes_nothing(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    model = tmp_path / "model.ckpt"
    convert_weight(tmp_path / "hf", model, progress=None)
    ok = _run("convert_reversed", "--mindspore_ckpt_path", str(model), "--torch_ckpt_path", str(tmp_path / "good"))
    assert ok.returncode == 0, ok.stderr
    _flip_bit(model)
    before = sorted(p.name for p in tmp_path.iterdir())
    run = _run("convert_reversed", "--mindspore_ckpt_path", str(model), "--torch_ckpt_path", str(tmp_path / "back"))
    _refused_as_damaged(run, model)
    assert "hint: rebuild the checkpoint or copy it again" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary left


def test_flipped_bit_stops_loading_into_the_network(tmp_path):
    from qwenbuild.model.network import QwenForCausalLM

    tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    net = QwenForCausalLM(QwenConfig.from_hf_dir(tmp_path / "hf"))
    load_weights(net, tmp_path / "model.ckpt")
    damaged = _flip_bit(tmp_path / "model.ckpt", tmp_path / "damaged.ckpt")
    with pytest.raises(UserError, match="damaged.ckpt is damaged: its CRC32 does not match") as err:
        load_weights(net, damaged)
    assert "stored " in str(err.value) and "computed " in str(err.value)


def test_flipped_bit_in_a_reshard_output_stops_transform_ckpt(tmp_path):
    full = tmp_path / "full.ckpt"
    rng = np.random.default_rng(1)
    write_checkpoint(full, [_tensor(n, rng.standard_normal(s).astype(np.float32), "float32")
                            for n, s in parameter_shapes(CFG).items()])
    st.write_strategy_files(CFG, 1, 2, 1, tmp_path / "mp2")
    reshard.transform_ckpt("", tmp_path / "mp2", full, tmp_path / "shards", progress=None)
    shard = tmp_path / "shards" / "rank_1" / "checkpoint_1.ckpt"
    assert has_crc(shard)
    ms.load_checkpoint(str(shard), crc_check=True)
    _flip_bit(shard)
    run = _run("transform_ckpt", "--src_ckpt_strategy", str(tmp_path / "mp2"), "--src_ckpt_dir",
               str(tmp_path / "shards"), "--dst_ckpt_dir", str(tmp_path / "back"))
    _refused_as_damaged(run, shard)
    assert not (tmp_path / "back").exists()


class _Weights(ms.nn.Cell):
    """A cell holding the tiny model's parameters under their MindFormers names."""

    def __init__(self, seed: int = 2):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weights = ms.ParameterTuple(ms.Parameter(ms.Tensor(rng.standard_normal(s).astype(np.float32)), name=n)
                                         for n, s in parameter_shapes(CFG).items())


def test_training_checkpoints_carry_a_crc_and_a_flipped_bit_is_refused(tmp_path):
    cell = _Weights()
    saved = checkpoint.save(cell, tmp_path / "run", 0, 4, 4, "qwen2", "digest", keep_max=2)
    assert has_crc(saved)
    assert set(parameter_shapes(CFG)) <= set(ms.load_checkpoint(str(saved), crc_check=True))
    checkpoint.load_into(_Weights(seed=3), saved, list(parameter_shapes(CFG)))

    damaged = _flip_bit(saved, tmp_path / "damaged.ckpt")
    with pytest.raises(UserError, match="damaged.ckpt is damaged: its CRC32 does not match"):
        checkpoint.load_into(_Weights(seed=3), damaged, list(parameter_shapes(CFG)))
    with pytest.raises(UserError, match="damaged.ckpt is damaged"):
        read_tensors(damaged)

    _flip_bit(saved)
    run = _run("transform_ckpt", "--dst_ckpt_strategy", str(_strategy(tmp_path)), "--src_ckpt_dir", str(saved),
               "--dst_ckpt_dir", str(tmp_path / "shards"))
    _refused_as_damaged(run, saved)
    assert not (tmp_path / "shards").exists()


def _strategy(tmp_path: Path) -> Path:
    st.write_strategy_files(CFG, 1, 2, 1, tmp_path / "mp2")
    return tmp_path / "mp2"


def test_a_file_without_a_trailer_reads_as_before(tmp_path):
    arrays = {**_arrays(), "step": np.array([3], np.int32)}
    path = tmp_path / "plain.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in arrays.items()], str(path))
    assert not has_crc(path)
    read = {t.name: mindspore_ckpt.read_array(t) for t in read_tensors(path)}
    assert read.keys() == arrays.keys()
    for name, a in arrays.items():
        np.testing.assert_array_equal(read[name], a)
    assert set(load_with_crc(path)) == set(arrays)


def test_a_cut_trailer_is_named_as_truncation(tmp_path):
    write_checkpoint(tmp_path / "q.ckpt", [_tensor("w", _arrays()["w"], "float32")])
    data = (tmp_path / "q.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-5])
    with pytest.raises(UserError, match="cut.ckpt is truncated: its CRC trailer"):
        read_index(tmp_path / "cut.ckpt")


def test_crc_is_computed_once_per_file_version_in_small_chunks(tmp_path, monkeypatch):
    arrays = _arrays()
    path = tmp_path / "q.ckpt"
    write_checkpoint(path, [_tensor(n, a, KINDS[a.dtype]) for n, a in arrays.items()])
    reads = []
    real = mindspore_ckpt._computed_crc

    def counted(f, nbytes, where):
        reads.append(where)
        return real(f, nbytes, where)

    monkeypatch.setattr(mindspore_ckpt, "_computed_crc", counted)
    monkeypatch.setattr(mindspore_ckpt, "CRC_READ_BYTES", 10)  # many chunks for a tiny file
    monkeypatch.setattr(mindspore_ckpt, "_CRC_MATCHED", set())
    read_tensors(path)
    read_index(path)
    assert len(reads) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    read_index(path)
    assert len(reads) == 2  # a rewritten file is checked again
