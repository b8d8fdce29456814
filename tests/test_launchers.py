"""Launch scripts: their msrun lines and environment, and a real two-node data-parallel job on loopback."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


JOB = '''
import os
import sys
import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.communication import init, get_rank, get_group_size

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
init()
ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
rank = get_rank()
w0 = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
net = nn.Dense(4, 2, weight_init=ms.Tensor(w0), bias_init="zeros")
opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
loss_fn = nn.MSELoss()


def forward(x, y):
    return loss_fn(net(x), y)


grad_fn = ms.value_and_grad(forward, None, opt.parameters)
reducer = nn.DistributedGradReducer(opt.parameters, mean=True)
rng = np.random.default_rng(rank)
for _ in range(3):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    _, grads = grad_fn(ms.Tensor(x), ms.Tensor(y))
    opt(reducer(grads))
env = [os.environ.get(k, "") for k in ("RANK_ID", "DEVICE_ID", "RANK_SIZE")]
np.savez(f"{sys.argv[1]}/rank_{rank}.npz", world=get_group_size(), weight=net.weight.asnumpy(),
         bias=net.bias.asnumpy(), env=np.array(env))
'''


def _reference(world: int = 2, steps: int = 3):
    """The same data-parallel SGD in numpy: mean of the ranks' MSE gradients."""
    w, b = np.arange(8, dtype=np.float64).reshape(2, 4) / 10, np.zeros(2)
    rngs = [np.random.default_rng(r) for r in range(world)]
    for _ in range(steps):
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for rng in rngs:
            x = rng.standard_normal((8, 4)).astype(np.float32).astype(np.float64)
            y = rng.standard_normal((8, 2)).astype(np.float32).astype(np.float64)
            dy = 2 * (x @ w.T + b - y) / y.size
            gw += dy.T @ x / world
            gb += dy.sum(0) / world
        w, b = w - 0.1 * gw, b - 0.1 * gb
    return w, b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_job(out: Path, logs: list[str]):
    w, b = _reference()
    for rank in (0, 1):
        assert (out / f"rank_{rank}.npz").is_file(), "\n".join(logs)
        got = np.load(out / f"rank_{rank}.npz")
        assert int(got["world"]) == 2
        # global RANK_ID and per-node DEVICE_ID, as run_multinode.sh numbered them (one worker per node here)
        assert list(got["env"]) == [str(rank), "0", "2"]
        np.testing.assert_allclose(got["weight"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["bias"], b, rtol=1e-5, atol=1e-6)


def _node_ok(rc: int, log: str) -> bool:
    # every node's msrun on one host sees the master address as its own and starts a scheduler; only the first one
    # binds the port, so a follower may exit 1 for its scheduler alone while its worker finished
    return rc == 0 or ("Scheduler process" in log and "Worker process" not in log)


@pytest.mark.slow
def test_two_msrun_nodes_on_loopback_run_a_data_parallel_job(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    out = tmp_path / "result"
    out.mkdir()
    nodes = [{"ip": "127.0.0.1", "host": "node-a"}, {"ip": "127.0.0.1", "host": "node-b"}]
    scripts = ln.launch_scripts(nodes, 1, ["python", "job.py", str(out)], device="cpu", master_port=_free_port(),
                                log_dir=str(tmp_path / "logs"), python_bin_dir=Path(sys.executable).parent,
                                workdir=tmp_path, cluster_time_out=120)
    paths = ln.write_launch_scripts(tmp_path / "launch", scripts)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK_", "MS_"))}
    procs = []
    for p in paths[:2]:
        procs.append(subprocess.Popen(["bash", str(p)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, cwd="/"))
        time.sleep(2)  # node 0 first, so the master's scheduler owns the port
    logs = [pr.communicate(timeout=240)[0] for pr in procs]
    assert procs[0].returncode == 0, logs[0][-3000:]
    assert _node_ok(procs[1].returncode, logs[1]), logs[1][-3000:]
    _check_job(out, logs)
    worker_logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert "worker_0.log" in worker_logs and "worker_1.log" in worker_logs

    # the sbatch script on the same host: srun emulated by starting its command once per node with SLURM_NODEID
    shim = tmp_path / "bin" / "srun"
    shim.parent.mkdir()
    shim.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\npids=()\n'
                    'for i in 0 1; do SLURM_NODEID=$i "$@" & pids+=($!); sleep 2; done\n'
                    'for p in "${pids[@]}"; do wait "$p" || true; done\n')
    shim.chmod(0o755)
    for f in out.iterdir():
        f.unlink()
    sbatch = ln.launch_scripts(nodes, 1, ["job.py", str(out)], device="cpu", master_port=_free_port(),
                               log_dir=str(tmp_path / "slurm_logs"), python_bin_dir=Path(sys.executable).parent,
                               workdir=tmp_path, cluster_time_out=120)["slurm.sbatch"]
    (tmp_path / "job.sbatch").write_text(sbatch)
    run = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, timeout=240,
                         env={**env, "PATH": f"{shim.parent}{os.pathsep}{env['PATH']}"})
    _check_job(out, [run.stdout[-3000:], run.stderr[-3000:]])
