"""Resharding a tiny GQA checkpoint: full -> shards -> full bit-exact, shard contents, MindSpore's own bytes (plus
the CRC trailer every file written here ends in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwenbuild.cli import main as cli
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import parameter_shapes
from qwenbuild.parallel import reshard, strategy as st
from qwenbuild.weights.mindspore_ckpt import read_array

CFG = QwenConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=16, n_kv_heads=8, intermediate_size=96)
QUIET = None  # progress callback


def _tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: rng.standard_normal(s).astype(np.float32) for n, s in parameter_shapes(CFG).items()}
    out["global_step"] = np.array([7], np.int32)  # a training counter outside every layout
    return out


def _save(tensors: dict, path: Path, bf16: bool = False, crc: bool = False) -> Path:
    import mindspore as ms

    path.parent.mkdir(parents=True, exist_ok=True)
    items = []
    for name, a in tensors.items():
        t = ms.Tensor(a, ms.bfloat16) if bf16 and a.dtype == np.float32 else ms.Tensor(a)
        items.append({"name": name, "data": t})
    ms.save_checkpoint(items, str(path), crc_check=crc)
    return path


def _without_crc(path: Path) -> bytes:
    """A written file's bytes less its CRC trailer: MindSpore's own transforms write none."""
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num", path
    return data[:-17]


def _load(path) -> dict[str, np.ndarray]:
    import mindspore as ms

    return {k: v.asnumpy() if v.dtype != ms.bfloat16 else v.float().asnumpy()
            for k, v in ms.load_checkpoint(str(path)).items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    full = _save(_tensors(), root / "full" / "rank_0" / "qwen.ckpt", crc=True)
    st.write_strategy_files(CFG, 1, 8, 1, root / "mp8")
    st.write_strategy_files(CFG, 1, 2, 1, root / "mp2")
    st.write_strategy_files(CFG, 1, 2, 2, root / "mp2pp2")
    reshard.transform_ckpt("", root / "mp8", full, root / "out8", progress=QUIET)
    return root


def test_full_to_8_shards_and_back_is_bit_exact(work):
    out = reshard.transform_ckpt(work / "mp8", "", work / "out8", work / "back", progress=QUIET)
    assert out["ranks"] == 1 and out["files"] == [work / "back" / "rank_0" / "checkpoint_0.ckpt"]
    # same names, order, dtypes and values: the very bytes save_checkpoint wrote for the original
    assert (work / "back/rank_0/checkpoint_0.ckpt").read_bytes() == (work / "full/rank_0/qwen.ckpt").read_bytes()


def test_8_to_2_to_full_is_bit_exact(work):
    reshard.transform_ckpt(work / "mp8" / "ckpt_strategy_rank_0.json", work / "mp2", work / "out8", work / "out2",
                           progress=QUIET)
    assert sorted(p.name for p in (work / "out2").iterdir() if p.is_dir()) == ["rank_0", "rank_1"]
    reshard.transform_ckpt(work / "mp2", None, work / "out2", work / "back2", progress=QUIET)
    assert (work / "back2/rank_0/checkpoint_0.ckpt").read_bytes() == (work / "full/rank_0/qwen.ckpt").read_bytes()


def test_a_shard_holds_exactly_its_slice(work):
    full = _tensors()
    layouts = st.stage_strategy(CFG, 1, 8, 1, 0)["parallel_layout_item"]
    for rank in (0, 3, 7):
        shard = _load(work / "out8" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
        assert set(shard) == set(full)
        for name, whole in full.items():
            tm = layouts.get(name, {"tensor_map": [-1] * whole.ndim})["tensor_map"]
            index = tuple(slice(rank * s // 8, (rank + 1) * s // 8) if t == 0 else slice(None)
                          for s, t in zip(whole.shape, tm))
            np.testing.assert_array_equal(shard[name], whole[index], err_msg=name)
    shard3 = _load(work / "out8/rank_3/checkpoint_3.ckpt")
    assert shard3["model.layers.1.attention.wk.weight"].shape == (8, 128)  # 8 kv heads x 8 dims / 8
    np.testing.assert_array_equal(shard3["model.layers.1.feed_forward.w2.weight"],
                                  full["model.layers.1.feed_forward.w2.weight"][:, 36:48])


def test_bytes_match_mindspore_transform_checkpoints(work):
    import mindspore as ms

    ms.transform_checkpoints(str(work / "full"), str(work / "ms8"), "checkpoint_", None,
                             str(work / "mp8" / "ckpt_strategy_rank_0.json"))
    for rank in range(8):
        assert _without_crc(work / f"out8/rank_{rank}/checkpoint_{rank}.ckpt") == \
            (work / f"ms8/rank_{rank}/checkpoint_{rank}.ckpt").read_bytes()


def test_pipeline_shards_hold_their_stage_only_and_merge_back(work):
    reshard.transform_ckpt("", work / "mp2pp2", work / "full", work / "pp", progress=QUIET)
    stage1 = _load(work / "pp/rank_3/checkpoint_3.ckpt")
    layers = {int(n.split(".")[2]) for n in stage1 if n.startswith("model.layers.")}
    assert layers == {2, 3}
    assert "lm_head.weight" in stage1 and "model.tok_embeddings.embedding_weight" not in stage1
    assert stage1["lm_head.weight"].shape == (128, 128)
    import mindspore as ms

    ms.merge_pipeline_strategys(str(work / "mp2pp2"), str(work / "merged" / "pp.json"))
    for rank in range(4):
        ref = work / "ms_pp" / f"rank_{rank}.ckpt"
        ref.parent.mkdir(exist_ok=True)
        ms.transform_checkpoint_by_rank(rank, {0: str(work / "full/rank_0/qwen.ckpt")}, str(ref), None,
                                        str(work / "merged" / "pp.json"))
        assert _without_crc(work / f"pp/rank_{rank}/checkpoint_{rank}.ckpt") == ref.read_bytes()
    # a directory of per-rank strategies is merged across stages, as transform_ckpt.py does
    reshard.transform_ckpt(work / "mp2pp2", "", work / "pp", work / "pp_back", progress=QUIET)
    back = _load(work / "pp_back/rank_0/checkpoint_0.ckpt")
    full = _tensors()
    assert set(back) == set(full)
    for name in parameter_shapes(CFG):
        np.testing.assert_array_equal(back[name], full[name], err_msg=name)


def test_bfloat16_round_trip_and_index(tmp_path):
    src = _save(_tensors(seed=1), tmp_path / "bf16.ckpt", bf16=True)
    index = reshard.tensor_index(src)
    assert index["lm_head.weight"].type_name == "BFloat16"
    assert read_array(index["lm_head.weight"]).dtype == np.float32
    st.write_strategy_files(CFG, 2, 4, 1, tmp_path / "s")
    reshard.transform_ckpt("", tmp_path / "s", src, tmp_path / "sh", progress=QUIET)
    reshard.transform_ckpt(tmp_path / "s", "", tmp_path / "sh", tmp_path / "back", progress=QUIET)
    # a source without a CRC trailer (MindSpore's default) reads as well; the output gains one
    assert _without_crc(tmp_path / "back/rank_0/checkpoint_0.ckpt") == src.read_bytes()


def test_index_reads_tensors_split_across_records(tmp_path, monkeypatch):
    import mindspore.train.serialization as ser

    monkeypatch.setattr(ser, "SLICE_SIZE", 16)  # KB: forces save_checkpoint to write big tensors in pieces
    tensors = _tensors(seed=2)
    path = _save(tensors, tmp_path / "sliced.ckpt")
    index = reshard.tensor_index(path)
    assert len(index["lm_head.weight"].parts) > 1
    for name, a in tensors.items():
        np.testing.assert_array_equal(read_array(index[name]), a)


def test_other_layouts_are_never_deleted(work, tmp_path):
    dst = tmp_path / "transformed"
    (dst / "notes").mkdir(parents=True)
    (dst / "notes" / "keep.txt").write_text("mine")
    reshard.transform_ckpt(work / "mp8", work / "mp2", work / "out8", dst, progress=QUIET)
    assert (dst / "notes" / "keep.txt").read_text() == "mine"
    eight = tmp_path / "y"
    reshard.transform_ckpt("", work / "mp8", work / "full", eight, progress=QUIET)
    with pytest.raises(UserError, match="rank_2") as err:
        reshard.transform_ckpt(work / "mp8", work / "mp2", work / "out8", eight, progress=QUIET)
    assert "nothing was changed" in str(err.value)
    assert len([p for p in (tmp_path / "y").iterdir() if p.is_dir()]) == 8


def test_rerun_is_deterministic(work, tmp_path):
    a = reshard.transform_ckpt(work / "mp8", work / "mp2", work / "out8", tmp_path / "a", progress=QUIET)
    b = reshard.transform_ckpt(work / "mp8", work / "mp2", work / "out8", tmp_path / "b", progress=QUIET)
    assert a["digest"] == b["digest"] and a["bytes"] == b["bytes"]


def test_bad_sources_are_named(work, tmp_path):
    with pytest.raises(UserError, match="no source strategy"):
        reshard.transform_ckpt("", work / "mp2", work / "out8", tmp_path / "o", progress=QUIET)
    with pytest.raises(UserError, match="lacks rank_2"):
        partial = tmp_path / "partial"
        for r in (0, 1):
            (partial / f"rank_{r}").mkdir(parents=True)
            (partial / f"rank_{r}" / "a.ckpt").write_bytes((work / f"out8/rank_{r}/checkpoint_{r}.ckpt").read_bytes())
        reshard.transform_ckpt(work / "mp8", "", partial, tmp_path / "o", progress=QUIET)
    (partial / "rank_0" / "b.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="holds 2 .ckpt files"):
        reshard.transform_ckpt(work / "mp8", "", partial, tmp_path / "o", progress=QUIET)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x12\x05hello world")
    with pytest.raises(UserError, match="not a readable MindSpore checkpoint"):
        reshard.transform_ckpt("", work / "mp2", garbage, tmp_path / "o", progress=QUIET)
    with pytest.raises(UserError, match="does not exist"):
        reshard.transform_ckpt(tmp_path / "nope", "", work / "out8", tmp_path / "o", progress=QUIET)
    assert not (tmp_path / "o").exists()


def test_transform_ckpt_command(work, capsys):
    assert cli(["transform_ckpt", "--src_ckpt_strategy", "", "--dst_ckpt_strategy", str(work / "mp2"),
                "--src_ckpt_dir", str(work / "full" / "rank_0" / "qwen.ckpt"), "--dst_ckpt_dir", "cli2",
                "--prefix", "qwen_"]) == 0
    assert Path("cli2/rank_1/qwen_1.ckpt").is_file()
    err = capsys.readouterr().err
    assert "rank 2/2" in err and "2 ranks" in err
    assert cli(["transform_ckpt", "--src_ckpt_strategy", str(work / "mp2"), "--src_ckpt_dir", "cli2",
                "--dst_ckpt_dir", "cli_full"]) == 0
    assert Path("cli_full/rank_0/checkpoint_0.ckpt").read_bytes() == (work / "full/rank_0/qwen.ckpt").read_bytes()
    capsys.readouterr()
    assert cli(["transform_ckpt", "--src_ckpt_dir", "missing", "--dst_ckpt_dir", "z"]) == 2
    assert "source checkpoint missing does not exist" in capsys.readouterr().err and not Path("z").exists()


def test_optimizer_moments_are_sliced_as_their_parameter_and_merge_back(tmp_path):
    """A training checkpoint (AdamW moments beside the weights) sharded mp2 x pp2 and merged back is the same
    checkpoint; each shard's moments are its parameters' slices, and `keep` writes the weights alone."""
    full = _tensors(seed=2)
    rng = np.random.default_rng(3)
    for name, shape in parameter_shapes(CFG).items():
        full[f"adam_m.{name}"] = rng.standard_normal(shape).astype(np.float32)
        full[f"adam_v.{name}"] = rng.random(shape).astype(np.float32)
    src = _save(full, tmp_path / "train.ckpt")
    st.write_strategy_files(CFG, 1, 2, 2, tmp_path / "s")
    reshard.transform_ckpt("", tmp_path / "s", src, tmp_path / "sh", progress=QUIET)
    rank3 = _load(tmp_path / "sh/rank_3/checkpoint_3.ckpt")  # stage 1, second slice
    name = "model.layers.3.attention.wq.weight"
    half = full[name].shape[0] // 2
    np.testing.assert_array_equal(rank3[f"adam_m.{name}"], full[f"adam_m.{name}"][half:])
    np.testing.assert_array_equal(rank3[f"adam_v.{name}"], full[f"adam_v.{name}"][half:])
    assert "adam_m.model.layers.0.attention.wq.weight" not in rank3  # layer 0 is on stage 0
    reshard.transform_ckpt(tmp_path / "s", "", tmp_path / "sh", tmp_path / "back", progress=QUIET)
    back = _load(tmp_path / "back/rank_0/checkpoint_0.ckpt")
    assert back.keys() == full.keys()
    for key, value in full.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    reshard.transform_ckpt(tmp_path / "s", "", tmp_path / "sh", tmp_path / "weights", progress=QUIET,
                           keep=lambda n: not n.startswith(("adam_", "global_step")))
    assert _load(tmp_path / "weights/rank_0/checkpoint_0.ckpt").keys() == parameter_shapes(CFG).keys()
