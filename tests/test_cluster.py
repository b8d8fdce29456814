"""The generated cluster files, run as they are: two nodes, each node_K.sh in its own network and UTS namespace with
the node's address and host name from qwen.toml (a veth pair between them), on an environment at another path than
the build host's, for both training engines. The ranks end with the same weights, and the losses are those of the
same rows trained on one node."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
ADDRESSES = ["10.213.0.1", "10.213.0.2"]
HOSTS = ["node0", "node1"]
NAMESPACES = ["qwenbuild-n0", "qwenbuild-n1"]
# MindFormers' loss monitor, one line per step
MINDFORMERS_STEP = re.compile(r"\{ Epoch:\[\s*\d+/\s*\d+\], step:\[\s*(\d+)/\s*\d+\], loss:\[([\d.]+)/")

pytestmark = pytest.mark.slow


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, util-linux)"
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


@pytest.fixture(scope="module")
def node_env(tmp_path_factory):
    """The nodes' Python environment at another path than the build host's: PATH inside the namespaces names only
    it (the build host's venv, symlinked elsewhere) and the system."""
    link = tmp_path_factory.mktemp("node-env") / "env"
    link.symlink_to(Path(sys.prefix))
    return {"PATH": f"{link / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8"}, link


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(root: Path, nodes: list[tuple[str, str]], devices_per_node: int) -> Path:
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("num_train = 4000", "num_train = 300")
    text = text.replace("devices_per_node = 2", f"devices_per_node = {devices_per_node}")
    text = text.replace("master_port = 8118", f"master_port = {_free_port()}")
    text = text.replace('[[hardware.nodes]]\nhost = "localhost"\nip = "127.0.0.1"\n',
                        "".join(f'[[hardware.nodes]]\nhost = "{host}"\nip = "{ip}"\n\n' for host, ip in nodes))
    text = text.replace("steps = 600", "steps = 6").replace("save_steps = 200", "save_steps = 3")
    manifest = root / "qwen.toml"
    manifest.write_text(text, encoding="utf-8")
    return manifest


@pytest.fixture(scope="module")
def cluster_project(tmp_path_factory):
    return _project(tmp_path_factory.mktemp("cluster"), list(zip(HOSTS, ADDRESSES)), 1)


@pytest.fixture(scope="module")
def one_node_project(tmp_path_factory):
    """The same rows and plan (data_parallel 2) on one node of two workers."""
    return _project(tmp_path_factory.mktemp("one-node"), [("localhost", "127.0.0.1")], 2)


def _build(manifest: Path, engine: str) -> Path:
    from qwenbuild.manifest.edit import set_keys

    set_keys(manifest, [("train.engine", f'"{engine}"')])
    proc = subprocess.run(DOIT + [f"manifest={manifest}", "launch", "run_config", "shard", "mindrecord"],
                          cwd=manifest.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    build = manifest.parent / "build"
    shutil.rmtree(build / "output" / "checkpoint", ignore_errors=True)
    return build


def _in_namespace(ns: str, host: str, script: Path, env: dict) -> subprocess.Popen:
    """A node: its network namespace, a UTS namespace with its host name, the script run as it is."""
    command = f"hostname {host} && exec bash {script}"
    return subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/")


def _final_weights(build: Path, rank: int) -> dict[str, np.ndarray]:
    import mindspore as ms

    rank_dir = build / "output" / "checkpoint" / f"rank_{rank}"
    meta = json.loads((rank_dir / "meta.json").read_text())
    loaded = ms.load_checkpoint(str(rank_dir / meta["last_ckpt_file"]))
    return {name: value.asnumpy() for name, value in loaded.items() if hasattr(value, "asnumpy")}


def _losses(build: Path, engine: str) -> list[float]:
    if engine == "qwenbuild":
        return json.loads((build / "output" / "metrics.json").read_text())["loss"]
    log = (build / "output" / "msrun_log" / "worker_0.log").read_text()
    return [float(m.group(2)) for m in MINDFORMERS_STEP.finditer(log)]


@pytest.mark.parametrize("engine", ["qwenbuild", "mindformers"])
def test_two_node_scripts_in_two_namespaces(two_hosts, node_env, cluster_project, one_node_project, engine):
    env, env_link = node_env
    build = _build(cluster_project, engine)
    for name in ("node_0.sh", "node_1.sh", "slurm.sbatch"):
        text = (build / "launch" / name).read_text()
        # nothing of the build host's environment is written into the scripts
        assert sys.prefix not in text and str(REPO / "qwenbuild") not in text and "site-packages" not in text, name
    procs = [_in_namespace(ns, HOSTS[k], build / "launch" / f"node_{k}.sh", env) for k, ns in enumerate(two_hosts)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    logs = "\n".join(f"--- node {k}:\n{o[-3000:]}" for k, o in enumerate(outputs))
    assert [p.returncode for p in procs] == [0, 0], logs
    for k, out in enumerate(outputs):
        assert f"node_check: node {k} ({HOSTS[k]}) sees 3 artifacts as qwen.lock records them" in out, logs
        # the node ran the environment PATH gave it, at its own path
        assert f"on {env_link / 'bin' / 'python3'}" in out, logs
    # data parallel: both ranks end with the same weights (and optimizer state)
    ranks = [_final_weights(build, rank) for rank in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) and any(".attention.wq." in n for n in ranks[0])
    for name, value in ranks[0].items():
        np.testing.assert_array_equal(value, ranks[1][name], err_msg=name)
    # the same rows trained on one node of two workers: the same losses and weights, step for step
    reference = _build(one_node_project, engine)
    proc = subprocess.run(["bash", str(reference / "launch" / "node_0.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                          cwd="/", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses, one_node = _losses(build, engine), _losses(reference, engine)
    assert len(losses) == 6 and losses == one_node, (losses, one_node)
    single = _final_weights(reference, 0)
    for name, value in ranks[0].items():
        np.testing.assert_array_equal(value, single[name], err_msg=name)


def test_a_node_started_on_the_wrong_host_stops_naming_both(two_hosts, node_env, cluster_project):
    env, _ = node_env
    build = cluster_project.parent / "build"
    if not (build / "launch" / "node_1.sh").is_file():
        build = _build(cluster_project, "qwenbuild")
    # node 1's script in node 0's namespace, under node 0's name
    proc = _in_namespace(two_hosts[0], HOSTS[0], build / "launch" / "node_1.sh", env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out
    assert ("node 1: this machine is not hardware.nodes[1] (host node1, ip 10.213.0.2): its host name is node0, not "
            "node1; it has no address 10.213.0.2") in out
