"""Launch scripts: their msrun lines and environment (test_cluster.py and test_slurm.py run them for real)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from qwenbuild.errors import UserError
from qwenbuild.parallel import launch_scripts as ln

ASCEND_NODES = [{"ip": f"10.0.0.{n + 1}", "host": f"npu{n}"} for n in range(4)]


def _ascend_scripts():
    return ln.launch_scripts(ASCEND_NODES, 8, "python run_qwen1_5.py --run_mode finetune", device="ascend",
                             rank_table_file="/shared/hccl_4s_32p.json", env=ln.mode_env("finetune", "ascend"),
                             python_bin_dir="/opt/venv/bin", workdir="/shared/job")


def test_ascend_node_scripts_run_msrun_with_the_original_environment():
    scripts = _ascend_scripts()
    assert sorted(scripts) == ["node_0.sh", "node_1.sh", "node_2.sh", "node_3.sh", "slurm.sbatch"]
    lines = scripts["node_2.sh"].splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[3:9] == ["cd /shared/job", 'export PATH=/opt/venv/bin:"$PATH"', "export RANK_SIZE=32",
                          "export RANK_TABLE_FILE=/shared/hccl_4s_32p.json",
                          "export MS_ASCEND_CHECK_OVERFLOW_MODE=INFNAN_MODE", "ulimit -u unlimited 2>/dev/null || true"]
    assert shlex.split(lines[-1]) == [
        "exec", "msrun", "--worker_num=32", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
        "--node_rank=2", "--log_dir=output/msrun_log", "--join=True", "--cluster_time_out=600",
        "--rank_table_file=/shared/hccl_4s_32p.json", "run_qwen1_5.py", "--run_mode", "finetune"]
    assert "ranks 16..23 of 32" in lines[1]


def test_slurm_script_takes_node_rank_from_slurm_nodeid():
    text = _ascend_scripts()["slurm.sbatch"]
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n" in text
    srun = shlex.split(text.splitlines()[-1])
    assert srun[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    inner = srun[5]
    assert '--node_rank="$SLURM_NODEID"' in inner and inner.startswith("exec msrun --worker_num=32")
    # the inner command expands SLURM_NODEID on each node
    echoed = subprocess.run(["bash", "-c", inner.replace("exec msrun", "echo", 1)], capture_output=True, text=True,
                            env={**os.environ, "SLURM_NODEID": "3"}).stdout
    assert "--node_rank=3 " in echoed


def test_scripts_are_valid_bash(tmp_path):
    paths = ln.write_launch_scripts(tmp_path, _ascend_scripts())
    for p in paths:
        assert os.access(p, os.X_OK)
        assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0, p


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
