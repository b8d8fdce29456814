"""A node checks the build dir it sees against qwen.lock before starting workers: the check line of the generated
node script, run as it is written there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from shlex import join as shlex_join

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
    assert "run.json data/mindrecord transformed_checkpoint/qwen" in line
    ok = _run(line, build)
    assert ok.returncode == 0 and "node 0 (localhost) sees 3 artifacts" in ok.stdout, ok.stderr
    shard = build / "transformed_checkpoint" / "qwen" / "rank_1" / "checkpoint_1.ckpt"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    copy = shard.with_name("copy")
    copy.write_bytes(bytes(data))
    os.replace(copy, shard)  # another file: what a node with a stale copy of the build dir would see
    bad = _run(line, build)
    assert bad.returncode == 2
    assert f"node 0 (localhost): {shard} changed since it was built" in bad.stderr
    assert "shared filesystem" in bad.stderr
    (build / "data" / "mindrecord" / "alpaca-messages.mindrecord.db").unlink()
    assert "alpaca-messages.mindrecord.db is missing" in _run(line, build).stderr


def test_a_node_that_is_not_the_one_qwen_toml_names_or_runs_other_versions_stops(tmp_path):
    import json

    from qwenbuild.lock import Lock
    from qwenbuild.train import node_check

    build = tmp_path / "build"
    lock = Lock(build / "qwen.lock")
    versions = {"python": "3.11", "qwenbuild": node_check.installed_version("qwenbuild"),
                "mindspore": node_check.installed_version("mindspore")}
    lock.record("launch", [], {}, {}, versions, build)
    argv = ["--build_dir", str(build), "--node", "1", "--workers", "1", "--toolchain_of", "launch", "x"]
    proc = _run(shlex_join(["python3", "-m", "qwenbuild.train.node_check", "--host", "localhost", "--ip",
                            "10.213.9.9"] + argv), tmp_path)
    assert proc.returncode == 2
    assert ("node 1: this machine is not hardware.nodes[1] (host localhost, ip 10.213.9.9): it has no address "
            "10.213.9.9") in proc.stderr
    proc = _run(shlex_join(["python3", "-m", "qwenbuild.train.node_check", "--host", "nosuchhost-qb", "--ip",
                            "127.0.0.1"] + argv), tmp_path)
    assert f"its host name is {socket.gethostname()}, not nosuchhost-qb" in proc.stderr and proc.returncode == 2
    # the node's own MindSpore differs from the one the build host recorded: named with both versions
    data = json.loads((build / "qwen.lock").read_text())
    data["tasks"]["launch"]["toolchain"]["mindspore"] = "2.8.0"
    (build / "qwen.lock").write_text(json.dumps(data))
    proc = _run(shlex_join(["python3", "-m", "qwenbuild.train.node_check", "--host", "localhost", "--ip",
                            "127.0.0.1"] + argv), tmp_path)
    assert proc.returncode == 2
    assert (f"node 1 (localhost): mindspore is {versions['mindspore']} here, but qwen.lock's launch task was built "
            "with 2.8.0") in proc.stderr
    assert "qwenbuild is" not in proc.stderr  # the same qwenbuild passes
    (build / "qwen.lock").write_text("{")
    proc = _run(shlex_join(["python3", "-m", "qwenbuild.train.node_check", "--host", "localhost", "--ip",
                            "127.0.0.1"] + argv), tmp_path)
    assert proc.returncode == 2 and "qwen.lock is damaged" in proc.stderr and "Traceback" not in proc.stderr
