"""Each [parallel] key flipped in qwen.toml reaches the MindFormers YAML, the strategy files and the shards together.

The tiny model is built for real (init_weights, convert, strategy, shard through doit) and its shards are read back;
the 72B topology is checked through its YAML and strategy files as MindSpore parses them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwenbuild.manifest import load_manifest
from qwenbuild.manifest._template import render
from qwenbuild.model.params import parameter_shapes
from qwenbuild.parallel.plan_rules import stage_layers
from qwenbuild.weights.mindspore_ckpt import read_tensors

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
EMBEDDING, WQ, W2 = "model.tok_embeddings.embedding_weight", "model.layers.0.attention.wq.weight", \
    "model.layers.0.feed_forward.w2.weight"


def _set(text: str, **keys) -> str:
    for key, value in keys.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    return text


def _doit(manifest: Path, *tasks: str) -> None:
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *tasks], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strategy_shape(strategy_file: Path, name: str, shape) -> list[int] | None:
    """The shard shape MindSpore derives from a strategy file for one parameter (None: not on this stage)."""
    import mindspore as ms

    layouts = ms.build_searched_strategy(str(strategy_file))
    if name not in layouts:
        return None
    dev = list(layouts[name].dev_matrix[0].dim)
    tensor_map = list(layouts[name].tensor_map[0].dim)
    return [s if t == -1 else s // dev[len(dev) - 1 - t] for s, t in zip(shape, tensor_map)]


def _agree(build: Path, m) -> None:
    """YAML, strategy files and shard files all say what the manifest says."""
    par, cfg = m.parallel, m.model.config
    doc = yaml.safe_load((build / "run_qwen1_5.yaml").read_text())
    pc = doc["parallel_config"]
    assert (pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"]) == \
        (par.data_parallel, par.model_parallel, par.pipeline_stage)
    assert (pc["vocab_emb_dp"], pc["use_seq_parallel"], pc["micro_batch_num"], pc["gradient_aggregation_group"]) == \
        (par.vocab_emb_dp, par.use_seq_parallel, par.micro_batch_num, par.gradient_aggregation_group)
    assert doc["recompute_config"]["recompute"] is par.recompute
    assert doc["model"]["model_config"]["offset"] == par.stage_offset
    stages = stage_layers(cfg.num_layers, par.pipeline_stage, par.stage_offset)
    shapes = parameter_shapes(cfg)
    per_stage = par.data_parallel * par.model_parallel
    for rank in range(par.world_size):
        stage = rank // per_stage
        strategy = build / "strategy" / f"ckpt_strategy_rank_{rank}.json"
        shard = {t.name: list(t.shape) for t in read_tensors(
            build / "transformed_checkpoint" / "qwen" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")}
        for name, shape in shapes.items():
            assert shard.get(name) == _strategy_shape(strategy, name, shape), (rank, name)
        # what the YAML's plan implies, from the manifest alone
        layers = {int(n.split(".")[2]) for n in shard if n.startswith("model.layers.")}
        assert layers == set(stages[stage]), rank
        if stage == 0:
            rows = cfg.vocab_size if par.vocab_emb_dp else cfg.vocab_size // par.model_parallel
            assert shard[EMBEDDING] == [rows, cfg.hidden_size]
        if 0 in stages[stage]:
            assert shard[WQ] == [cfg.num_heads * cfg.head_dim // par.model_parallel, cfg.hidden_size]
            assert shard[W2] == [cfg.hidden_size, cfg.intermediate_size // par.model_parallel]


FLIPS = [
    {},
    {"vocab_emb_dp": "false", "data_parallel": "1", "model_parallel": "2"},
    {"vocab_emb_dp": "true", "data_parallel": "1", "model_parallel": "2"},
    {"data_parallel": "1", "pipeline_stage": "2", "micro_batch_num": "2"},
    {"data_parallel": "1", "pipeline_stage": "2", "micro_batch_num": "4", "recompute": "true",
     "use_seq_parallel": "true", "gradient_aggregation_group": "2"},
]


@pytest.mark.slow
def test_each_parallel_key_reaches_yaml_strategy_and_shards(tmp_path):
    # the Ascend YAML spells out every parallel key (the CPU one refuses model and pipeline parallel)
    base = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("num_train = 4000", "num_train = 300") \
        .replace('device = "cpu"', 'device = "ascend"')
    manifest = tmp_path / "qwen.toml"
    for flip in FLIPS:
        manifest.write_text(_set(base, **flip), encoding="utf-8")
        _doit(manifest, "shard", "run_config")
        _agree(tmp_path / "build", load_manifest(manifest))


def test_72b_yaml_and_strategy_follow_the_manifest(tmp_path, qwen_dir):
    """The seed's 4 x 8 topology: vocab_emb_dp, recompute and seq parallel as qwen.toml says, both ways."""
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.tasks import task_specs
    from qwenbuild.tasks.context import Context, DeclaredManifest

    text = render("qwen1.5-72b")
    for flip in ({}, {"vocab_emb_dp": "false", "recompute": "false", "use_seq_parallel": "false"}):
        manifest = tmp_path / "qwen.toml"
        manifest.write_text(_set(text, **flip), encoding="utf-8")
        m = load_manifest(manifest)
        build = BuildDir(m.build_dir)
        build.tokenizer.parent.mkdir(parents=True, exist_ok=True)
        if not build.tokenizer.exists():
            build.tokenizer.symlink_to(qwen_dir)
        for spec in task_specs(m):
            if spec.name in ("run_config", "strategy"):
                spec.action(Context(spec.name, DeclaredManifest(m, spec.name, spec.keys), build))
        doc = yaml.safe_load(build.mindformers_yaml.read_text())
        pc, par = doc["parallel_config"], m.parallel
        assert (pc["model_parallel"], pc["pipeline_stage"], pc["micro_batch_num"]) == (8, 4, 48)
        assert pc["vocab_emb_dp"] is par.vocab_emb_dp and pc["use_seq_parallel"] is par.use_seq_parallel
        assert doc["recompute_config"]["recompute"] is par.recompute
        assert doc["model"]["model_config"]["compute_dtype"] == "bfloat16"
        rows = 152064 if par.vocab_emb_dp else 152064 // 8
        first = build.strategy / "ckpt_strategy_rank_0.json"
        assert _strategy_shape(first, EMBEDDING, (152064, 8192)) == [rows, 8192]
        assert _strategy_shape(first, WQ, (8192, 8192)) == [1024, 8192]
        last = build.strategy / "ckpt_strategy_rank_31.json"
        assert _strategy_shape(last, "model.layers.79.feed_forward.w2.weight", (8192, 24576)) == [8192, 3072]
        assert _strategy_shape(last, WQ, (8192, 8192)) is None
        assert json.loads(first.read_text())["current_stage"] == 0
