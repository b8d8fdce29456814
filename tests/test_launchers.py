"""Launch scripts: their msrun lines and environment (test_cluster.py and test_slurm.py run them for real)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from qwenbuild.errors import UserError
from qwenbuild.parallel import launch_scripts as ln

ASCEND_NODES = [{"ip": f"10.0.0.{n + 1}", "host": f"npu{n}"} for n in range(4)]
CHECK = ["qwenbuild.train.node_check", "--node", "{node}", "--host", "{host}", "--ip", "{ip}"]


def _ascend_scripts(**kw):
    return ln.launch_scripts(ASCEND_NODES, 8, "python run_qwen1_5.py --run_mode finetune", device="ascend",
                             rank_table_file="/shared/hccl_4s_32p.json", env=ln.mode_env("finetune", "ascend"),
                             workdir="/shared/job", check=CHECK, **kw)


def test_ascend_node_scripts_run_msrun_with_the_original_environment():
    scripts = _ascend_scripts(python="/opt/env/bin/python3", env_script="/usr/local/Ascend/set_env.sh")
    assert sorted(scripts) == ["node_0.sh", "node_1.sh", "node_2.sh", "node_3.sh", "slurm.sbatch"]
    lines = [line for line in scripts["node_2.sh"].splitlines() if not line.startswith("# ")]
    assert lines[:7] == ["#!/usr/bin/env bash", "set -euo pipefail", "cd /shared/job", "set +u",
                         "source /usr/local/Ascend/set_env.sh", "set -u",
                         "python=$(command -v /opt/env/bin/python3) || { echo 'node_2.sh: hardware.python "
                         "/opt/env/bin/python3 is not found on this node; PATH:' \"$PATH\" >&2; exit 127; }"]
    assert lines[7:12] == ['export PATH="${python%/*}:$PATH"', "export RANK_SIZE=32",
                           "export RANK_TABLE_FILE=/shared/hccl_4s_32p.json",
                           "export MS_ASCEND_CHECK_OVERFLOW_MODE=INFNAN_MODE", "ulimit -u unlimited 2>/dev/null || true"]
    assert shlex.split(lines[12]) == ["python3", "-m", "qwenbuild.train.node_check", "--node", "2", "--host", "npu2",
                                      "--ip", "10.0.0.3"]
    # msrun as a module of the nodes' python, which it also starts the workers with
    assert shlex.split(lines[13]) == [
        "exec", "python3", "-m", "mindspore.parallel.cluster.run", "--worker_num=32", "--local_worker_num=8",
        "--master_addr=10.0.0.1", "--master_port=8118", "--node_rank=2", "--log_dir=output/msrun_log", "--join=True",
        "--cluster_time_out=600", "--rank_table_file=/shared/hccl_4s_32p.json", "python3", "run_qwen1_5.py",
        "--run_mode", "finetune"]
    assert "ranks 16..23 of 32" in scripts["node_2.sh"].splitlines()[1]
    assert len(lines) == 14


def test_the_python_decides_the_worker_name_and_no_build_host_path_is_written(tmp_path):
    scripts = ln.launch_scripts([{"ip": "127.0.0.1", "host": "localhost"}], 2, ["-m", "qwenbuild.train.worker"],
                                python="python")
    last = shlex.split(scripts["node_0.sh"].splitlines()[-1])
    assert last[:4] == ["exec", "python", "-m", "mindspore.parallel.cluster.run"]
    assert last[-3:] == ["python", "-m", "qwenbuild.train.worker"]
    assert "--master_port=${MASTER_PORT:-8118}" in last
    assert "/.venv/" not in scripts["node_0.sh"] and "site-packages" not in scripts["node_0.sh"]
    for bad in ("/usr/bin/python3.11", "bin/python3", "py"):
        with pytest.raises(UserError, match="python3 or python"):
            ln.launch_scripts([{"ip": "127.0.0.1"}], 1, ["-m", "x"], python=bad)


def _inner(text: str) -> str:
    srun = shlex.split(text.splitlines()[-1])
    assert srun[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    return srun[5]


def test_slurm_script_pins_the_hosts_and_takes_each_rank_from_the_host_name(tmp_path):
    text = _ascend_scripts()["slurm.sbatch"]
    assert "#SBATCH --nodes=4\n#SBATCH --nodelist=npu0,npu1,npu2,npu3\n#SBATCH --ntasks-per-node=1\n" in text
    inner = _inner(text)
    # run the node part with stand-ins for the nodes' python and msrun: each prints what it was given
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    for node, expected in (("npu3", "3"), ("npu0", "0")):
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURMD_NODENAME": node,
               "SLURM_NODEID": "1"}  # Slurm's own numbering is not the rank
        out = subprocess.run(["bash", "-c", inner], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        check, msrun = out.stdout.splitlines()
        assert check == f"python3 -m qwenbuild.train.node_check --node {expected} --host {node} " \
                        f"--ip 10.0.0.{int(expected) + 1}"
        assert f"--node_rank={expected} " in msrun and "--master_addr=10.0.0.1 " in msrun
    out = subprocess.run(["bash", "-c", inner], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": os.environ["PATH"], "SLURMD_NODENAME": "elsewhere"})
    assert out.returncode == 2 and "none of hardware.nodes (npu0, npu1, npu2, npu3): elsewhere" in out.stderr


def test_scripts_are_valid_bash(tmp_path):
    paths = ln.write_launch_scripts(tmp_path, _ascend_scripts())
    for p in paths:
        assert os.access(p, os.X_OK)
        assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0, p


def test_a_node_without_the_python_stops_naming_it(tmp_path):
    scripts = ln.launch_scripts([{"ip": "127.0.0.1", "host": "localhost"}], 1, ["-m", "x"],
                                python="/nonexistent/env/bin/python3")
    path = ln.write_launch_scripts(tmp_path, scripts)[0]
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True)
    assert out.returncode == 127
    assert "node_0.sh: hardware.python /nonexistent/env/bin/python3 is not found on this node" in out.stderr


def test_mode_environment_and_bad_input():
    assert ln.mode_env("finetune", "ascend") == {"MS_ASCEND_CHECK_OVERFLOW_MODE": "INFNAN_MODE"}
    assert ln.mode_env("predict", "ascend") == {"MS_GE_TRAIN": "0", "MS_ENABLE_GE": "1", "MS_ENABLE_REF_MODE": "1"}
    assert ln.mode_env("finetune", "cpu") == {}
    with pytest.raises(UserError, match="run mode"):
        ln.mode_env("serve", "cpu")
    with pytest.raises(UserError, match="RANK_TABLE_FILE"):
        ln.launch_scripts(ASCEND_NODES, 8, "x.py", device="ascend")
    with pytest.raises(UserError, match="node 1 has no ip"):
        ln.launch_scripts([{"ip": "1.2.3.4"}, {"host": "b"}], 1, "x.py")
    with pytest.raises(UserError, match="empty"):
        ln.launch_scripts([{"ip": "1.2.3.4"}], 1, "python")


@pytest.mark.parametrize("node, message", [
    ({"ip": "1.2.3.4", "host": "x\ntouch X; exit 3 #"}, "not a host name"),
    ({"ip": "1.2.3.4; id", "host": "a"}, "not an IPv4 address"),
    ({"ip": "1.2.3.4", "host": "a b"}, "not a host name"),
])
def test_a_value_that_is_not_what_it_claims_is_refused_by_the_writer(node, message):
    with pytest.raises(UserError, match=message):
        ln.launch_scripts([node], 1, ["-m", "x"])


def test_every_value_is_one_word_and_a_line_break_is_refused_anywhere(tmp_path):
    odd = "/data/it's a $(touch PWNED) `x` dir"
    scripts = ln.launch_scripts([{"ip": "127.0.0.1", "host": "localhost"}], 1, ["-m", "x", "--data", odd],
                                workdir=odd, env={"NOTE": "a;b|c"}, env_script=odd + "/env.sh", job_name="j'b")
    text = scripts["node_0.sh"]
    assert f"cd {shlex.quote(odd)}" in text and shlex.split(text.splitlines()[-1])[-1] == odd
    assert "#SBATCH --job-name='j'\"'\"'b'" in scripts["slurm.sbatch"]
    for line_break in ("\n", "\r", "\u2028"):
        with pytest.raises(UserError, match="cannot be written into a generated script"):
            ln.launch_scripts([{"ip": "127.0.0.1"}], 1, ["-m", "x", f"a{line_break}b"])
        with pytest.raises(UserError, match="cannot be written into a generated script"):
            ln.launch_scripts([{"ip": "127.0.0.1"}], 1, ["-m", "x"], workdir=f"/a{line_break}id")


def test_node_scripts_run_in_the_directory_found_from_where_they_lie(tmp_path):
    """workdir_from_script: node_K.sh changes to a directory relative to its own place, whatever the caller's
    directory, so a copied build dir runs its own files; slurm.sbatch, which Slurm runs from a copy, keeps the path."""
    scripts = ln.launch_scripts([{"ip": "127.0.0.1", "host": "localhost"}], 1, ["-m", "x", "--config", "run.json"],
                                workdir="/shared/build", workdir_from_script="..")
    assert 'cd "$(dirname -- "${BASH_SOURCE[0]}")"/..' in scripts["node_0.sh"].splitlines()
    assert "cd /shared/build" in scripts["slurm.sbatch"].splitlines() and "/shared/build" not in scripts["node_0.sh"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\npwd\n')  # the stand-in msrun says where it was started
    (bin_dir / "python3").chmod(0o755)
    for build in (tmp_path / "project" / "build", tmp_path / "copy of it" / "build"):
        (build / "launch").mkdir(parents=True)
        path = ln.write_launch_scripts(build / "launch", scripts)[0]
        out = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path,
                             env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
        assert out.returncode == 0 and out.stdout.splitlines() == [str(build)], out.stderr
