"""The generated slurm.sbatch submitted to a real Slurm (Debian's slurm-wlm and munge, started here with a one-node
configuration), for both training engines, on the Python hardware.python names; the job's state is read from Slurm's
own job-completion record, its ranks end with the same weights, and its losses are those of the node script run
outside Slurm."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]

# MindFormers' loss monitor, one line per step
MINDFORMERS_STEP = re.compile(r"\{ Epoch:\[\s*\d+/\s*\d+\], step:\[\s*(\d+)/\s*\d+\], loss:\[([\d.]+)/")

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd here needs root"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slurm-wlm munge, as .ci/run does)"
    return None


def _munge() -> None:
    """munged, run as its own user (it refuses to run as root), with a key of its own."""
    if subprocess.run(["bash", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    for _ in range(50):
        if subprocess.run(["bash", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("munged did not start")


def _conf(root: Path, host: str) -> Path:
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=qwenbuild-test", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={root / 'jobcomp.txt'}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldPort=6917", "SlurmdPort=6918", "ReturnToService=2", "MpiDefault=none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster: this host, all its CPUs."""
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm test: {reason}")
        pytest.skip(reason)
    _munge()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = _conf(root, host)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)]
    time.sleep(1)
    daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
    try:
        for _ in range(100):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the node never became idle: {state!r}; "
                                 f"{(root / 'slurmctld.log').read_text()[-2000:]}")
        yield env, root
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)


def _final_weights(build: Path, rank: int) -> dict:
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
def test_generated_sbatch_completes_under_slurm(slurm, tmp_path, engine):
    env, root = slurm
    host = socket.gethostname().split(".")[0]
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("num_train = 4000", "num_train = 300")
    text = text.replace("steps = 600", "steps = 6").replace("save_steps = 200", "save_steps = 3")
    # the Slurm node is this host, by the name Slurm knows it
    text = text.replace('host = "localhost"', f'host = "{host}"')
    manifest = tmp_path / "qwen.toml"
    manifest.write_text(text, encoding="utf-8")
    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.parallel.launch_scripts import free_port

    # the job's Python by absolute path, at another path than the build host's environment (a symlink to it)
    link = tmp_path / "node-env"
    link.symlink_to(Path(sys.prefix))
    # a port of its own: other tests' msrun schedulers may run beside it
    set_keys(manifest, [("train.engine", f'"{engine}"'), ("hardware.master_port", str(free_port())),
                        ("hardware.python", json.dumps(str(link / "bin" / "python3")))])
    built = subprocess.run(DOIT + [f"manifest={manifest}", "launch", "run_config", "shard", "mindrecord"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    build = tmp_path / "build"
    sbatch = build / "launch" / "slurm.sbatch"
    assert f"#SBATCH --nodelist={host}\n" in sbatch.read_text()
    # the job sees no qwenbuild environment on its PATH: only hardware.python names one
    job_env = {**env, "PATH": "/usr/bin:/bin"}
    job = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(tmp_path / "job.out"), str(sbatch)],
                         env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    job_id = job.stdout.strip().split(";")[0]
    assert job.returncode == 0, job.stderr + out[-3000:]
    record = [line for line in (root / "jobcomp.txt").read_text().splitlines() if f"JobId={job_id} " in line]
    assert record and "JobState=COMPLETED" in record[0], record
    assert f"NodeList={host} " in record[0]
    logs = build / "output" / "msrun_log"
    assert (logs / "worker_0.log").is_file() and (logs / "worker_1.log").is_file()
    assert f"node_check: node 0 ({host}) sees 3 artifacts" in out and f"on {link / 'bin' / 'python3'}" in out
    # both data-parallel ranks end with the same weights
    ranks = [_final_weights(build, rank) for rank in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) and any(".attention.wq." in n for n in ranks[0])
    for name, value in ranks[0].items():
        np.testing.assert_array_equal(value, ranks[1][name], err_msg=name)
    losses = _losses(build, engine)
    # the same rows trained by the node script itself, outside Slurm: the same losses and weights
    shutil.rmtree(build / "output" / "checkpoint")
    shutil.rmtree(logs)
    (build / "output" / "metrics.json").unlink(missing_ok=True)
    direct = subprocess.run(["bash", str(build / "launch" / "node_0.sh")], capture_output=True, text=True,
                            env={**os.environ, "PATH": "/usr/bin:/bin"}, cwd="/", timeout=900)
    assert direct.returncode == 0, direct.stdout[-2000:] + direct.stderr[-3000:]
    assert len(losses) == 6 and losses == _losses(build, engine)
    for name, value in _final_weights(build, 0).items():
        np.testing.assert_array_equal(value, ranks[0][name], err_msg=name)
