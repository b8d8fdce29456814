"""Tensor parallelism on CPU: the shards the `shard` task writes, run by model-parallel processes under msrun,
give transformers' logits; the seed's dp1 x mp8 x pp4 at small size, with the vocabulary whole and split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tb_events
from hf_tiny import tiny_hf_model

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
# (name, dp, mp, pp, vocab_emb_dp): 8 processes each, so one msrun runs them all
CASES = [("mp8_pp4_vocab_whole", 1, 8, 4, True), ("mp8_pp4_vocab_split", 1, 8, 4, False),
         ("dp2_mp4_vocab_split", 2, 4, 1, False), ("dp4_mp2_vocab_split", 4, 2, 1, False)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from qwenbuild.parallel import reshard
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.convert import convert_weight

    root = tmp_path_factory.mktemp("tp")
    # the checkpoint is written beside the model directory, never into it (nothing is written inside an input)
    hf = tiny_hf_model(root / "hf", n_kv_heads=8, heads=8, hidden=64, intermediate=96, layers=4, vocab=104, seed=3)
    convert_weight(root / "hf", root / "full.ckpt", progress=None)
    cfg = QwenConfig.from_hf_dir(root / "hf")
    ids = np.random.default_rng(0).integers(0, 104, (2, 9)).astype(np.int32)
    np.save(root / "input_ids.npy", ids)
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    cases = []
    for name, dp, mp, pp, vocab_emb_dp in CASES:
        write_strategy_files(cfg, dp, mp, pp, root / name / "strategy", vocab_emb_dp)
        reshard.transform_ckpt("", root / name / "strategy", root / "full.ckpt", root / name / "shards", progress=None)
        cases.append({"strategy": str(root / name / "strategy"), "shards": str(root / name / "shards"),
                      "pipeline_stage": pp, "out": str(root / name / "logits.npy")})
    (root / "cases.json").write_text(json.dumps(cases))
    return root, expected


def test_sharded_forward_across_processes_equals_transformers(sharded):
    from qwenbuild.parallel.launch_scripts import local_msrun
    from qwenbuild.train.msrun import run_workers, worker_env

    root, expected = sharded
    bin_dir = Path(sys.executable).parent
    argv = local_msrun(8, root / "logs", [str(TESTS / "tp_forward.py"), str(root / "cases.json")], bin_dir)
    run_workers(argv, root / "logs", 8, worker_env(bin_dir))
    for name, *_ in CASES:
        got = np.load(root / name / "logits.npy")
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
    log = (root / "logs" / "worker_5.log").read_text()
    # process 5 of dp1 x mp8 x pp4 stands for rank 5 of each stage and holds the sixth slice
    assert "mp8_pp4_vocab_whole/logits.npy: process 5 holds ranks (5, 13, 21, 29), mp index 5" in log
    assert "dp2_mp4_vocab_split/logits.npy: process 5 holds ranks (5,), mp index 1" in log


# (name, dp, mp, pp, devices on the node, batch per data-parallel rank and micro batch, the layout it must equal):
# the same global batch of 4 rows (pipeline_stage 2 runs 2 micro batches). Each data-parallel rank's loss is the
# mean over its own rows' target tokens (as MindFormers computes it), so a dp2 run equals dp2 with one process each
LAYOUTS = [("dp1_mp1", 1, 1, 1, 1, 4, None), ("dp1_mp2", 1, 2, 1, 2, 4, "dp1_mp1"),
           ("dp1_mp2_pp2", 1, 2, 2, 4, 2, "dp1_mp1"), ("dp2_mp1", 2, 1, 1, 2, 2, None),
           ("dp2_mp2", 2, 2, 1, 4, 2, "dp2_mp1")]
STEPS = 20


def _params(path) -> dict:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if not isinstance(v, str)}


def test_doit_finetune_model_parallel_equals_one_device(tmp_path):
    """`doit finetune` through the generated node script and msrun: per-step losses and the merged weights of
    every layout equal the single-process run's."""
    import subprocess

    from faults import reduced_manifest
    from qwenbuild.manifest.edit import set_keys

    repo = TESTS.parent
    doit = [sys.executable, "-m", "doit", "-f", str(repo / "dodo.py")]
    manifest = reduced_manifest(tmp_path)
    # Qwen1.5's own starting spread: from the default's 0.088, AdamW turned rounding-level gradient differences into
    # up to 1.3e-5 in one of the 65,536 elements of a vocabulary table after 20 steps
    set_keys(manifest, [("train.steps", str(STEPS)), ("train.save_steps", "10"), ("parallel.vocab_emb_dp", "false"),
                        ("dataset.num_heldout", "4"), ("model.init_std", "0.02")])
    build = tmp_path / "build"
    losses, weights = {}, {}
    for name, dp, mp, pp, devices, batch, _ in LAYOUTS:
        set_keys(manifest, [("parallel.data_parallel", str(dp)), ("parallel.model_parallel", str(mp)),
                            ("parallel.pipeline_stage", str(pp)), ("hardware.devices_per_node", str(devices)),
                            ("train.batch_size", str(batch)), ("parallel.micro_batch_num", str(pp))])
        run = subprocess.run(doit + [f"manifest={manifest}", "finetune"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, name + run.stdout + run.stderr[-4000:]
        assert f"merged into {build / 'output' / 'merged_checkpoint'}" in run.stderr
        metrics = json.loads((build / "output" / "metrics.json").read_text())
        assert metrics["data_parallel"] == dp and len(metrics["loss"]) == STEPS
        losses[name] = metrics["loss"]
        # TensorBoard's curves are this run's alone (the earlier layout's files were removed): its losses and the
        # held-out accuracy measured after it, one event file from training and one from the evaluation
        tensorboard = build / "output" / "tensorboard" / "rank_0"
        assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 2, name
        logged = tb_events.scalars(tensorboard)
        assert logged["loss"] == dict(enumerate(np.float32(metrics["loss"]).tolist(), start=1)), name
        assert logged["heldout-accuracy"] == {STEPS: float(np.float32(metrics["heldout_accuracy"]))}, name
        weights[name] = _params(build / "output" / "merged_checkpoint" / "rank_0" / "checkpoint_0.ckpt")
        ranks = sorted(p.name for p in (build / "output" / "checkpoint").glob("rank_*"))
        assert len(ranks) >= dp * mp * pp
        if pp > 1:
            log = (build / "output" / "msrun_log" / "worker_0.log").read_text()
            assert "pipeline_stage=2: each process runs the layers of every stage in sequence" in log
    assert losses["dp1_mp1"][-1] < losses["dp1_mp1"][0]
    for name, *_, same_as in LAYOUTS:
        if same_as is None:
            continue
        np.testing.assert_allclose(losses[name], losses[same_as], rtol=0, atol=1e-4, err_msg=name)
        assert weights[name].keys() == weights[same_as].keys()
        # AdamW moves an element on a near-zero gradient by up to lr = 3e-3 on rounding alone: 1% of one step
        for key, value in weights[same_as].items():
            np.testing.assert_allclose(weights[name][key], value, rtol=0, atol=3e-5, err_msg=f"{name} {key}")
    # the merged checkpoint of the last layout converts back to a model transformers loads
    from transformers import Qwen2ForCausalLM

    from qwenbuild.cli import main as cli

    merged = build / "output" / "merged_checkpoint" / "rank_0" / "checkpoint_0.ckpt"
    assert cli(["convert_reversed", "--mindspore_ckpt_path", str(merged), "--torch_ckpt_path",
                str(tmp_path / "hf_out")]) == 0
    hf = dict(Qwen2ForCausalLM.from_pretrained(tmp_path / "hf_out").named_parameters())
    last = weights[LAYOUTS[-1][0]]  # dp2 x mp2, the last run
    np.testing.assert_array_equal(hf["model.layers.1.self_attn.k_proj.bias"].detach().numpy(),
                                  last["model.layers.1.attention.wk.bias"])
    np.testing.assert_array_equal(hf["lm_head.weight"].detach().numpy(), last["lm_head.weight"])


def test_dp2_mp2_equals_one_process_when_rows_hold_as_many_targets(tmp_path):
    """Rows whose target tokens are all trained (as many per row): dp2 x mp2 under msrun gives one process's
    per-step losses, at the same global batch."""
    sys.path.insert(0, str(TESTS.parent / "bench"))  # the benchmarks' synthetic rows
    from bench_train import synthetic_mindrecord

    from qwenbuild.manifest._presets import MODELS
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.train.msrun import run_msrun
    from qwenbuild.train.settings import TrainSettings, write_run_json
    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model

    cfg = QwenConfig(**MODELS["tiny"])
    records = synthetic_mindrecord(tmp_path / "rows.mindrecord", 200, 24, cfg.vocab_size)
    write_random_hf_model(cfg, 0, tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "init.ckpt", progress=None)
    runs = {}
    for dp, mp in ((1, 1), (2, 2)):
        tag = f"dp{dp}_mp{mp}"
        write_strategy_files(cfg, dp, mp, 1, tmp_path / tag / "strategy", vocab_emb_dp=False)
        transform_ckpt("", tmp_path / tag / "strategy", tmp_path / "init.ckpt", tmp_path / tag / "shards",
                       progress=None)
        settings = TrainSettings(model=cfg, train_data=records, output_dir=str(tmp_path / tag / "out"),
                                 seq_length=24, batch_size=8 // dp, learning_rate=3e-3, steps=STEPS,
                                 save_steps=STEPS, data_parallel=dp, model_parallel=mp,
                                 init_checkpoint=str(tmp_path / tag / "shards"),
                                 strategy_dir=str(tmp_path / tag / "strategy"))
        write_run_json(tmp_path / tag / "run.json", settings)
        run_msrun(dp * mp, tmp_path / tag / "run.json", tmp_path / tag / "logs")
        runs[tag] = json.loads((tmp_path / tag / "out" / "metrics.json").read_text())["loss"]
    np.testing.assert_allclose(runs["dp2_mp2"], runs["dp1_mp1"], rtol=0, atol=1e-4)
    assert runs["dp1_mp1"][-1] < runs["dp1_mp1"][0]
