"""The generated slurm.sbatch submitted to a real Slurm (Debian's slurm-wlm and munge, started here with a one-node
configuration), for both training engines; the job's state is read from Slurm's own job-completion record."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]

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


@pytest.mark.parametrize("engine", ["qwenbuild", "mindformers"])
def test_generated_sbatch_completes_under_slurm(slurm, tmp_path, engine):
    env, root = slurm
    text = (REPO / "qwen.toml").read_text(encoding="utf-8").replace("num_train = 4000", "num_train = 300")
    text = text.replace("steps = 600", "steps = 6").replace("save_steps = 200", "save_steps = 3")
    manifest = tmp_path / "qwen.toml"
    manifest.write_text(text, encoding="utf-8")
    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.parallel.launch_scripts import free_port

    # a port of its own: other tests' msrun schedulers may run beside it
    set_keys(manifest, [("train.engine", f'"{engine}"'), ("hardware.master_port", str(free_port()))])
    built = subprocess.run(DOIT + [f"manifest={manifest}", "launch", "run_config", "shard", "mindrecord"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    build = tmp_path / "build"
    job = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(tmp_path / "job.out"),
                          str(build / "launch" / "slurm.sbatch")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    job_id = job.stdout.strip().split(";")[0]
    assert job.returncode == 0, job.stderr + out[-3000:]
    record = [line for line in (root / "jobcomp.txt").read_text().splitlines() if f"JobId={job_id} " in line]
    assert record and "JobState=COMPLETED" in record[0], record
    for rank in (0, 1):
        meta = json.loads((build / "output" / "checkpoint" / f"rank_{rank}" / "meta.json").read_text())
        assert (build / "output" / "checkpoint" / f"rank_{rank}" / meta["last_ckpt_file"]).is_file()
    logs = build / "output" / "msrun_log"
    assert (logs / "worker_0.log").is_file() and (logs / "worker_1.log").is_file()
    assert "node_check: node 0 sees 3 artifacts" in out
