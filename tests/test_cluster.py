"""The generated cluster files, run as they are: two nodes, each node_K.sh in its own network namespace with the
node's address from qwen.toml (a veth pair between them), for both training engines."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
ADDRESSES = ["10.213.0.1", "10.213.0.2"]
NAMESPACES = ["qwenbuild-n0", "qwenbuild-n1"]

pytestmark = pytest.mark.slow


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.213.0.1 and 10.213.0.2."""
    reason = _can_make_namespaces()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the two-node test: {reason}")
        pytest.skip(reason)
    for ns in NAMESPACES:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for ns in NAMESPACES:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "qb-veth0", "netns", NAMESPACES[0], "type", "veth", "peer", "name", "qb-veth1",
            "netns", NAMESPACES[1])
        for i, ns in enumerate(NAMESPACES):
            _sh("ip", "-n", ns, "addr", "add", f"{ADDRESSES[i]}/24", "dev", f"qb-veth{i}")
            _sh("ip", "-n", ns, "link", "set", f"qb-veth{i}", "up")
        yield NAMESPACES
    finally:
        for ns in NAMESPACES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("num_train = 4000", "num_train = 300")
    text = text.replace("devices_per_node = 2", "devices_per_node = 1")
    text = text.replace("master_port = 8118", f"master_port = {_free_port()}")
    text = text.replace('[[hardware.nodes]]\nhost = "localhost"\nip = "127.0.0.1"\n',
                        "".join(f'[[hardware.nodes]]\nhost = "node{i}"\nip = "{ip}"\n\n'
                                for i, ip in enumerate(ADDRESSES)))
    text = text.replace("steps = 600", "steps = 6").replace("save_steps = 200", "save_steps = 3")
    manifest = root / "qwen.toml"
    manifest.write_text(text, encoding="utf-8")
    return manifest


def _doit(manifest: Path, *tasks: str) -> None:
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *tasks], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("engine", ["qwenbuild", "mindformers"])
def test_two_node_scripts_in_two_namespaces(two_hosts, cluster_project, engine):
    from qwenbuild.manifest.edit import set_keys

    set_keys(cluster_project, [("train.engine", f'"{engine}"')])
    _doit(cluster_project, "launch", "run_config", "shard", "mindrecord")
    build = cluster_project.parent / "build"
    shutil.rmtree(build / "output" / "checkpoint", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK_", "MS_", "MASTER_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    procs = []
    for k, ns in enumerate(two_hosts):
        script = build / "launch" / f"node_{k}.sh"
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bash", str(script)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env, cwd="/"))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    logs = "\n".join(f"--- node {k}:\n{o[-3000:]}" for k, o in enumerate(outputs))
    assert [p.returncode for p in procs] == [0, 0], logs
    for rank in (0, 1):
        meta = json.loads((build / "output" / "checkpoint" / f"rank_{rank}" / "meta.json").read_text())
        assert (build / "output" / "checkpoint" / f"rank_{rank}" / meta["last_ckpt_file"]).is_file(), logs
    assert all("node_check: node" in o for o in outputs), logs
