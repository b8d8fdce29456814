"""MindFormers' own Trainer as the training engine: the generated node script runs mindformers_run.py on the YAML,
and it trains like qwenbuild's loop from the same shards, data and settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tb_events

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
STEP = re.compile(r"\{ Epoch:\[\s*\d+/\s*\d+\], step:\[\s*(\d+)/\s*\d+\], loss:\[([\d.]+)/")

pytestmark = pytest.mark.slow


def _doit(manifest: Path, *tasks) -> subprocess.CompletedProcess:
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *tasks], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny build whose every row is the same conversation: any order of rows gives both engines the same
    batches, so their losses can be compared step by step."""
    from qwenbuild.data.instructions import tokenizer_corpus, write_instruction_dataset
    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("engines")
    train, _ = write_instruction_dataset(root / "instructions", seed=0, num_train=4000, num_heldout=10)
    rows = json.loads(train.read_text())
    train_tokenizer(tokenizer_corpus(rows), 505, root / "tok")
    (root / "rows.json").write_text(json.dumps([rows[0]] * 64), encoding="utf-8")
    manifest = root / "qwen.toml"
    manifest.write_text((REPO / "qwen.toml").read_text(), encoding="utf-8")
    set_keys(manifest, [("dataset.source", '"alpaca"'), ("dataset.path", '"rows.json"'), ("tokenizer.kind", '"hf"'),
                        ("tokenizer.dir", '"tok"'), ("train.steps", "20"), ("train.save_steps", "20"),
                        ("train.batch_size", "4"), ("train.engine", '"qwenbuild"')])
    return manifest


def test_mindformers_trains_like_qwenbuild_from_the_same_inputs(project):
    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.weights import convert_reversed

    build = project.parent / "build"
    tensorboard = build / "output" / "tensorboard"
    _doit(project, "finetune")
    ours = json.loads((build / "output" / "metrics.json").read_text())["loss"]
    # qwenbuild's events hold its losses, as float32 (the events' scalar type)
    ours_logged = tb_events.scalars(tensorboard / "rank_0")
    assert ours_logged["loss"] == dict(enumerate(np.float32(ours).tolist(), start=1))
    set_keys(project, [("train.engine", '"mindformers"')])
    proc = _doit(project, "finetune")
    assert ".  launch" in proc.stdout and ".  finetune" in proc.stdout and ".  shard" not in proc.stdout
    for line in ("mindformers_run: CPU: loss-scale overflow check = isfinite",
                 "mindformers_run: CPU: barrier = an all-reduce"):
        assert line in proc.stderr
    log = (build / "output" / "msrun_log" / "worker_0.log").read_text()
    printed = [float(m.group(2)) for m in STEP.finditer(log)]
    assert len(printed) == 20  # 8 steps an epoch (64 rows, 4 x 2 workers), stopped at train.steps
    # MindFormers' own TensorBoard events (the YAML's tensorboard block), one directory per rank, hold the losses
    # it printed (to the 6 decimals printed), a grad norm and our tokens/s per step
    assert sorted(p.name for p in tensorboard.iterdir()) == ["rank_0", "rank_1"]
    # qwenbuild's run's file was removed when this one started: one file per rank, MindFormers' own
    assert len(list((tensorboard / "rank_0").glob("events.out.tfevents.*"))) == 1
    logged = tb_events.scalars(tensorboard / "rank_0")
    assert sorted(logged["loss"]) == list(range(1, 21))
    theirs = [logged["loss"][step] for step in range(1, 21)]
    np.testing.assert_allclose(theirs, printed, rtol=0, atol=5.1e-7)
    assert sorted(logged["grad-norm"]) == sorted(logged["tokens-per-second"]) == list(range(1, 21))
    assert min(logged["tokens-per-second"].values()) > 0
    # the same arithmetic up to float32 rounding (kernels and summation order): measured 1.9e-5 apart at most over
    # the 20 steps from the default's starting spread; weight decay skips 1-D parameters in both, as MindFormers does
    np.testing.assert_allclose(theirs, ours, rtol=5e-5, atol=0)
    # the same schedule, MindFormers' evaluated in float32 (1.5e-6 apart at most)
    np.testing.assert_allclose([logged["learning-rate"][step] for step in range(1, 21)],
                               [ours_logged["learning-rate"][step] for step in range(1, 21)], rtol=1e-5, atol=0)
    assert ours[-1] < ours[0] / 2
    script = (build / "launch" / "node_0.sh").read_text()
    assert "python3 -m qwenbuild.train.mindformers_run --config" in script and "--run_mode finetune" in script
    # MindFormers' own checkpoint, in its own layout, converts back to a Hugging Face model
    meta = json.loads((build / "output" / "checkpoint" / "rank_1" / "meta.json").read_text())
    ckpt = build / "output" / "checkpoint" / "rank_1" / meta["last_ckpt_file"]
    summary = convert_reversed(ckpt, project.parent / "hf_back", build / "weights" / "hf_init", progress=None)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(project.parent / "hf_back")
    assert summary["tensors"] == len(model.state_dict())
