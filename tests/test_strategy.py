"""Strategy files: the qwen1.5-72b plan's layouts, the pipeline stage rule against MindFormers, the per-rank plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenbuild.cli import main as cli
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import num_parameters
from qwenbuild.parallel import plan_rules, shard_sizes
from qwenbuild.parallel import strategy as st

QWEN72B = QwenConfig(vocab_size=152064, hidden_size=8192, num_layers=80, num_heads=64, n_kv_heads=64,
                     intermediate_size=24576, param_dtype="bfloat16")
TINY_GQA = QwenConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=8, n_kv_heads=2, intermediate_size=96)

# shard shapes of one rank under mp 8 for qwen1.5-72b, by parameter group
SHARD_72B = {
    "attention.wq.weight": [1024, 8192], "attention.wk.weight": [1024, 8192], "attention.wv.weight": [1024, 8192],
    "attention.wq.bias": [1024], "attention.wk.bias": [1024], "attention.wv.bias": [1024],
    "attention.wo.weight": [8192, 1024], "feed_forward.w1.weight": [3072, 8192],
    "feed_forward.w3.weight": [3072, 8192], "feed_forward.w2.weight": [8192, 3072],
    "attention_norm.weight": [8192], "ffn_norm.weight": [8192],
}


def _ms_shard(shape, layout):
    """Shard shape from a layout as MindSpore parsed it (protobuf ParallelLayouts)."""
    dev = list(layout.dev_matrix[0].dim)
    return [s if t == -1 else s // dev[len(dev) - 1 - t] for s, t in zip(shape, layout.tensor_map[0].dim)]


@pytest.fixture(scope="module")
def strategy_72b(tmp_path_factory):
    out = tmp_path_factory.mktemp("s72") / "strategy"
    files = st.write_strategy_files(QWEN72B, 1, 8, 4, out)
    return out, files


def test_72b_plan_gives_32_files_with_right_shard_shapes(strategy_72b):
    import mindspore as ms
    from qwenbuild.model.params import parameter_shapes

    out, files = strategy_72b
    assert [p.name for p in files] == [f"ckpt_strategy_rank_{r}.json" for r in range(32)]
    # and the seal that marks the directory as qwenbuild's (a later run may replace it)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in files] + [".qwenbuild-seal.json"])
    shapes = parameter_shapes(QWEN72B)
    for rank in (0, 9, 23, 31):
        stage = rank // 8
        layouts = ms.build_searched_strategy(str(files[rank]))
        layers = {int(n.split(".")[2]) for n in layouts if n.startswith("model.layers.")}
        assert layers == set(range(20 * stage, 20 * stage + 20))
        for name, layout in layouts.items():
            got = _ms_shard(shapes[name], layout)
            if name.startswith("model.layers."):
                assert got == SHARD_72B[name.split(".", 3)[3]], name
        top = {n for n in layouts if not n.startswith("model.layers.")}
        assert top == ({"model.tok_embeddings.embedding_weight"} if stage == 0 else
                       {"model.norm_out.weight", "lm_head.weight"} if stage == 3 else set())
        if stage == 0:
            assert _ms_shard(shapes["model.tok_embeddings.embedding_weight"],
                             layouts["model.tok_embeddings.embedding_weight"]) == [19008, 8192]
        if stage == 3:
            assert _ms_shard(shapes["lm_head.weight"], layouts["lm_head.weight"]) == [19008, 8192]
            assert _ms_shard(shapes["model.norm_out.weight"], layouts["model.norm_out.weight"]) == [8192]
    # ranks of one stage share one file content
    assert files[8].read_bytes() == files[15].read_bytes() != files[16].read_bytes()


def test_72b_strategies_merge_across_stages(strategy_72b, tmp_path):
    import mindspore as ms
    from mindspore.parallel._parallel_serialization import _extract_layout_map

    out, _ = strategy_72b
    merged = tmp_path / "merged.json"
    ms.merge_pipeline_strategys(str(out), str(merged))
    layouts = _extract_layout_map(str(merged))
    assert len(layouts) == 80 * 12 + 3
    assert layouts["model.layers.45.feed_forward.w2.weight"][:2] == [[1, 8], [-1, 0]]
    assert layouts["model.layers.45.feed_forward.w2.weight"][6] == [2]
    assert layouts["lm_head.weight"][6] == [3]
    assert layouts["model.tok_embeddings.embedding_weight"][6] == [0]


@pytest.mark.parametrize("num_layers, pp, offset", [(80, 4, 0), (24, 5, [0, 1, 1, 1, 1]), (7, 3, [0, 1, 0]),
                                                     (30, 4, [1, 0, 0, 1]), (4, 2, 0)])
def test_stage_rule_matches_mindformers_layer_setting(num_layers, pp, offset):
    from mindformers.modules.transformer import TransformerOpParallelConfig
    from mindformers.parallel_core.training_graph.transformer.utils import LayerSetting

    ours = plan_rules.stage_layers(num_layers, pp, offset)
    theirs = LayerSetting(num_layers, offset, TransformerOpParallelConfig(pipeline_stage=pp)).pp_ids
    assert [s for i in range(num_layers) for s, r in enumerate(ours) if i in r] == [int(x) for x in theirs]


def test_uneven_layers_need_an_offset():
    with pytest.raises(UserError, match="adding up to 2") as err:
        plan_rules.stage_layers(30, 4)
    assert "offset = [0, 0, 1, 1]" in str(err.value)


@pytest.mark.parametrize("mp, vocab_emb_dp, message", [
    (3, True, "num_heads 8"), (4, True, "n_kv_heads 2"), (2, False, None),
])
def test_plan_divisibility(mp, vocab_emb_dp, message):
    if message is None:
        plan_rules.check_plan(TINY_GQA, 1, mp, 1, vocab_emb_dp)
    else:
        with pytest.raises(UserError, match=message):
            plan_rules.check_plan(TINY_GQA, 1, mp, 1, vocab_emb_dp)
    odd_vocab = QwenConfig(vocab_size=250, hidden_size=64, num_layers=2, num_heads=8, n_kv_heads=8,
                           intermediate_size=96)
    with pytest.raises(UserError, match="vocab_emb_dp"):
        plan_rules.check_plan(odd_vocab, 1, 4, 1)
    plan_rules.check_plan(odd_vocab, 1, 4, 1, vocab_emb_dp=True)


def test_gqa_and_vocab_emb_dp_layouts():
    s = st.stage_strategy(TINY_GQA, 2, 2, 1, 0, vocab_emb_dp=True)
    lay = s["parallel_layout_item"]
    assert lay["model.layers.0.attention.wk.weight"]["dev_matrix"] == [2, 2]
    assert st.shard_shape((16, 64), [2, 2], lay["model.layers.0.attention.wk.weight"]["tensor_map"]) == [8, 64]
    assert lay["model.tok_embeddings.embedding_weight"]["tensor_map"] == [-1, -1]
    assert lay["lm_head.weight"]["tensor_map"] == [-1, -1]
    assert lay["model.layers.3.feed_forward.w2.weight"]["tensor_map"] == [-1, 0]
    assert lay["model.norm_out.weight"]["tensor_map"] == [-1]
    assert all(v["stage"] == 0 for v in s["parallel_strategy_item"].values())


def test_tied_embedding_lives_on_first_and_last_stage():
    tied = QwenConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=8, n_kv_heads=2,
                      intermediate_size=96, tie_word_embeddings=True)
    last = st.stage_strategy(tied, 1, 2, 2, 1)["parallel_layout_item"]
    assert "model.tok_embeddings.embedding_weight" in last and "lm_head.weight" not in last


def test_rank_shards_72b():
    plan = shard_sizes.rank_shards(QWEN72B, 1, 8, 4, node_devices=[list(range(8))] * 4)
    assert len(plan) == 32
    r9 = plan[9]
    assert (r9["node"], r9["device"], r9["stage"], r9["layers"], r9["model_parallel_index"]) == (1, 1, 1, [20, 39], 1)
    wq = r9["groups"]["layers.attention.wq.weight"]
    assert wq == {"count": 20, "full_shape": [8192, 8192], "shard_shape": [1024, 8192], "bytes": 20 * 1024 * 8192 * 2}
    per_layer = 3 * 1024 * 8192 + 3 * 1024 + 8192 * 1024 + 3 * 3072 * 8192 + 2 * 8192
    assert r9["bytes"] == 20 * per_layer * 2
    assert plan[0]["bytes"] == (20 * per_layer + 19008 * 8192) * 2
    assert plan[31]["bytes"] == (20 * per_layer + 19008 * 8192 + 8192) * 2
    assert sum(p["bytes"] for p in plan[::8]) * 8 == pytest.approx(num_parameters(QWEN72B) * 2, rel=0.001)
    with pytest.raises(UserError, match="hold 8 devices"):
        shard_sizes.rank_shards(QWEN72B, 1, 8, 4, node_devices=[list(range(8))])


def test_collect_strategy_files_checks_a_supplied_dir(tmp_path):
    out = tmp_path / "s"
    st.write_strategy_files(TINY_GQA, 2, 2, 1, out)
    assert [p.name for p in st.collect_strategy_files(out, 4)] == [f"ckpt_strategy_rank_{r}.json" for r in range(4)]
    with pytest.raises(UserError, match="missing \\[4, 5, 6, 7\\]"):
        st.collect_strategy_files(out, 8)
    (out / "ckpt_strategy_rank_3.json").write_text("{not json")
    with pytest.raises(UserError, match="ckpt_strategy_rank_3.json cannot be read"):
        st.collect_strategy_files(out, 4)
    (out / "ckpt_strategy_rank_4.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="mixes"):
        st.collect_strategy_files(out)


def test_strategy_command(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_GQA.to_hf_dict()))
    assert cli(["strategy", "--model_dir", str(model), "--model_parallel", "2", "--pipeline_stage", "2",
                "--output_dir", "out"]) == 0
    assert len(list(Path("out").glob("ckpt_strategy_rank_*.json"))) == 4
    assert st.strategy_stage("out/ckpt_strategy_rank_3.json") == 1
    capsys.readouterr()
    assert cli(["strategy", "--check", "out", "--world_size", "4"]) == 0
    assert capsys.readouterr().out == "out: 4 strategy files readable by MindSpore\n"
    # a missing rank is named
    Path("out/ckpt_strategy_rank_2.json").unlink()
    assert cli(["strategy", "--check", "out", "--world_size", "4"]) == 2
    assert "out has strategy files for ranks [0, 1, 3], the plan has 4 ranks (missing [2])" in capsys.readouterr().err
    assert cli(["strategy", "--model_dir", str(model), "--model_parallel", "3", "--output_dir", "bad"]) == 2
    assert "num_heads 8" in capsys.readouterr().err and not Path("bad").exists()


def test_shard_table_for_plan_and_default_offset():
    text = shard_sizes.shard_table(QWEN72B, {"data_parallel": 1, "model_parallel": 8, "pipeline_stage": 4}, 32)
    rows = text.splitlines()
    assert rows[1].split() == ["stage", "0", "ranks", "0-7", "model.tok_embeddings.embedding_weight", "1",
                               "19008x8192", "297.0"]
    assert any(r.split()[-3:] == ["20", "3072x8192", "960.0"] and "w1" in r for r in rows)
    assert sum(r.strip().startswith("total, layers") for r in rows) == 4
    with pytest.raises(UserError, match="16 devices"):
        shard_sizes.shard_table(QWEN72B, {"data_parallel": 1, "model_parallel": 8, "pipeline_stage": 4}, 16)
    assert plan_rules.default_offset(80, 4) == 0
    assert plan_rules.default_offset(30, 4) == [0, 0, 1, 1]
    assert [len(r) for r in plan_rules.stage_layers(30, 4, plan_rules.default_offset(30, 4))] == [7, 7, 8, 8]
