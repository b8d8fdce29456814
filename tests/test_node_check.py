"""A node checks the build dir it sees against qwen.lock before starting workers: the check line of the generated
node script, run as it is written there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]

pytestmark = pytest.mark.slow  # builds the data chain, shards and launch scripts through doit


def _check_line(script: Path) -> str:
    [line] = [l for l in script.read_text().splitlines() if "qwenbuild.train.node_check" in l]
    return line


def _run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_a_node_refuses_a_build_dir_that_differs_from_the_lock(tmp_path):
    text = (REPO / "qwen.toml").read_text().replace("num_train = 4000", "num_train = 300")
    manifest = tmp_path / "qwen.toml"
    manifest.write_text(text)
    proc = subprocess.run(DOIT + [f"manifest={manifest}", "launch", "run_config", "shard", "mindrecord"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build = tmp_path / "build"
    line = _check_line(build / "launch" / "node_0.sh")
    assert "run.json data/mindrecord output/transformed_checkpoint/qwen" in line
    ok = _run(line, build)
    assert ok.returncode == 0 and "node 0 sees 3 artifacts" in ok.stdout, ok.stderr
    shard = build / "output" / "transformed_checkpoint" / "qwen" / "rank_1" / "checkpoint_1.ckpt"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    copy = shard.with_name("copy")
    copy.write_bytes(bytes(data))
    os.replace(copy, shard)  # another file: what a node with a stale copy of the build dir would see
    bad = _run(line, build)
    assert bad.returncode == 2
    assert f"node 0: {shard} changed since it was built" in bad.stderr and "shared filesystem" in bad.stderr
    (build / "data" / "mindrecord" / "alpaca-messages.mindrecord.db").unlink()
    assert "alpaca-messages.mindrecord.db is missing" in _run(line, build).stderr
