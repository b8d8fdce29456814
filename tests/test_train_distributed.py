"""Data parallel through msrun, and kill -9 then resume, on real MindSpore worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.train import checkpoint
from qwenbuild.train.settings import write_run_json
from train_data import progression_rows, settings, write_mindrecord

pytestmark = pytest.mark.slow


def params_of(path) -> dict[str, np.ndarray]:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if not isinstance(v, str)}


def last_checkpoint(output_dir, rank: int):
    meta = checkpoint.read_meta(output_dir, rank)
    return checkpoint.rank_dir(output_dir, rank) / meta["last_ckpt_file"]


def test_two_workers_agree_and_match_one_worker_with_the_same_global_batch(tmp_path):
    from qwenbuild.train.finetune import finetune
    from qwenbuild.train.msrun import run_msrun

    path = write_mindrecord(tmp_path / "d.mindrecord", progression_rows(40))
    two = settings(path, tmp_path / "two", batch_size=2, data_parallel=2, steps=12, save_steps=6)
    write_run_json(tmp_path / "two.json", two)
    run_msrun(2, tmp_path / "two.json", tmp_path / "logs")
    rank0, rank1 = params_of(last_checkpoint(two.output_dir, 0)), params_of(last_checkpoint(two.output_dir, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)

    one = finetune(settings(path, tmp_path / "one", batch_size=4, data_parallel=1, steps=12, save_steps=6))
    alone = params_of(one["checkpoint"])
    for name in rank0:
        np.testing.assert_allclose(rank0[name], alone[name], rtol=1e-4, atol=2e-5, err_msg=name)
    two_losses = json.loads((tmp_path / "two" / "metrics.json").read_text())["loss"]
    np.testing.assert_allclose(two_losses, one["loss"], rtol=1e-4)
    assert one["loss"][-1] < one["loss"][0]


def test_failed_worker_reports_its_log(tmp_path):
    from qwenbuild.train.msrun import run_msrun

    s = settings(tmp_path / "missing.mindrecord", tmp_path / "out", batch_size=2, data_parallel=2)
    write_run_json(tmp_path / "run.json", s)
    with pytest.raises(UserError, match=r"rank \d failed[\s\S]*missing.mindrecord: MindRecord file"):
        run_msrun(2, tmp_path / "run.json", tmp_path / "logs")


def _worker(run_json, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qwenbuild.train.worker", "--config", str(run_json)],
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_then_resume_gives_the_uninterrupted_result(tmp_path):
    path = write_mindrecord(tmp_path / "d.mindrecord", progression_rows(48))
    steps = 300
    whole = settings(path, tmp_path / "whole", steps=steps, save_steps=25)
    write_run_json(tmp_path / "whole.json", whole)
    first = _worker(tmp_path / "whole.json")
    assert first.communicate()[1] is not None and first.returncode == 0

    cut = settings(path, tmp_path / "cut", steps=steps, save_steps=25)
    write_run_json(tmp_path / "cut.json", cut)
    proc = _worker(tmp_path / "cut.json")
    killed_at = None
    for line in proc.stderr:
        if line.startswith("step "):
            done = int(line.split()[1].split("/")[0])
            if done >= 40:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done
                break
    proc.wait()
    assert killed_at is not None and killed_at < steps, "the run ended before it could be interrupted"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    saved = max(checkpoint.saved_steps(cut.output_dir, 0, "qwen2", 12))
    assert 25 <= saved < steps

    resumed = _worker(tmp_path / "cut.json")
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert f"resuming from step {saved}/{steps}" in err
    a, b = params_of(last_checkpoint(whole.output_dir, 0)), params_of(last_checkpoint(cut.output_dir, 0))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["loss"] == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())["loss"]
