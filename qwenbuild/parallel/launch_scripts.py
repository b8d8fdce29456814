"""Launch scripts from one hardware description: a shell script per node running msrun, and a Slurm sbatch script.

msrun gives every worker DEVICE_ID = its index on the node and RANK_ID = node_rank * local workers + index, the
numbering run_multinode.sh used; the scripts export RANK_SIZE, RANK_TABLE_FILE (Ascend) and the mode's variables.
The msrun command line is written here only: the scripts, `doit finetune` and `qwenbuild finetune` all use it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.store import atomic_path

# variables the original workflow's README sets per run mode on Ascend
MODE_ENV = {
    "finetune": {"MS_ASCEND_CHECK_OVERFLOW_MODE": "INFNAN_MODE"},
    "train": {"MS_ASCEND_CHECK_OVERFLOW_MODE": "INFNAN_MODE"},
    "predict": {"MS_GE_TRAIN": "0", "MS_ENABLE_GE": "1", "MS_ENABLE_REF_MODE": "1"},
    "export": {},
}
DEVICES = ("ascend", "cpu")
# a single CPU node takes its port from the caller when given: one machine may run several builds
PORT_VARIABLE = "MASTER_PORT"
# the sbatch script's msrun master: the address of the allocation's first node
MASTER_VARIABLE = "QWENBUILD_MASTER_ADDR"


def mode_env(mode: str, device: str) -> dict[str, str]:
    """Environment the original sets for a run mode; CPU runs need none of the Ascend switches."""
    if mode not in MODE_ENV:
        raise UserError(f"unknown run mode {mode!r}", hint=f"use one of {', '.join(MODE_ENV)}")
    return dict(MODE_ENV[mode]) if device == "ascend" else {}


def script_args(command: list[str] | str) -> list[str]:
    """The python script and its arguments; msrun starts `python` itself, so a leading python is dropped."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if args and os.path.basename(args[0]).startswith("python"):
        args = args[1:]
    if not args:
        raise UserError("the command to launch is empty", hint="give the python script and its arguments")
    return args


def msrun_command(world: int, local_workers: int, master_addr: str, master_port: int | str, node_rank: int | str,
                  log_dir: str | Path, args: list[str], *, rank_table_file: str | Path | None = None,
                  cluster_time_out: int = 600, tail_worker_log: int | None = None) -> list[str]:
    """msrun's argv for one node; tail_worker_log = local_workers + 1 keeps msrun from tailing worker logs."""
    argv = ["msrun", f"--worker_num={world}", f"--local_worker_num={local_workers}", f"--master_addr={master_addr}",
            f"--master_port={master_port}", f"--node_rank={node_rank}", f"--log_dir={log_dir}", "--join=True",
            f"--cluster_time_out={cluster_time_out}"]
    if tail_worker_log is not None:
        argv.append(f"--tail_worker_log={tail_worker_log}")
    if rank_table_file:
        argv.append(f"--rank_table_file={rank_table_file}")
    return argv + list(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_msrun(workers: int, log_dir: str | Path, args: list[str], python_bin_dir: str | Path) -> list[str]:
    """argv of msrun starting `workers` processes of a script on this machine alone, on a free port, tailing no
    worker log; msrun is the one beside the Python that has MindSpore."""
    msrun = shutil.which("msrun", path=str(python_bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    if msrun is None:
        raise UserError(f"msrun was not found in {python_bin_dir} or on PATH",
                        hint="install mindspore into that environment (msrun ships with it)")
    return [msrun] + msrun_command(workers, workers, "127.0.0.1", free_port(), 0, log_dir, args,
                                   tail_worker_log=workers + 1)[1:]


def _shell(argv: list[str], raw: dict[str, str]) -> str:
    """argv quoted for bash, except the values in `raw` (shell expressions such as "$SLURM_NODEID")."""
    return " ".join(raw.get(a, shlex.quote(a)) for a in argv)


def _check(nodes: list[dict], workers_per_node: int, device: str, rank_table_file) -> None:
    if not nodes:
        raise UserError("the topology has no nodes")
    if workers_per_node < 1:
        raise UserError(f"devices_per_node must be at least 1, not {workers_per_node}")
    if device not in DEVICES:
        raise UserError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    for i, node in enumerate(nodes):
        if not node.get("ip"):
            raise UserError(f"node {i} has no ip", hint="every node needs the address the others reach it at")
    if device == "ascend" and not rank_table_file:
        raise UserError("an Ascend topology needs the RANK_TABLE_FILE path")


def _exports(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]


def _preamble(title: str, python_bin_dir, workdir, env: dict[str, str], from_script: str | None = None) -> list[str]:
    lines = ["#!/usr/bin/env bash", f"# {title}", "set -euo pipefail"]
    if from_script is not None:  # the directory is found from where the script lies, so a copied one moves along
        lines.append(f'cd "$(dirname -- "${{BASH_SOURCE[0]}}")"/{shlex.quote(from_script)}')
    elif workdir:
        lines.append(f"cd {shlex.quote(str(workdir))}")
    if python_bin_dir:
        lines.append(f"export PATH={shlex.quote(str(python_bin_dir))}:\"$PATH\"")
    lines += _exports(env)
    lines.append("ulimit -u unlimited 2>/dev/null || true")
    return lines


def launch_scripts(nodes: list[dict], workers_per_node: int, command: list[str] | str, *, device: str = "cpu",
                   master_port: int = 8118, log_dir: str = "output/msrun_log", env: dict[str, str] | None = None,
                   python_bin_dir: str | Path | None = None, rank_table_file: str | Path | None = None,
                   workdir: str | Path | None = None, cluster_time_out: int = 600,
                   tail_worker_log: int | None = None, check: list[str] | None = None,
                   job_name: str = "qwenbuild", workdir_from_script: str | None = None) -> dict[str, str]:
    """{file name: text}: node_<k>.sh for every node and slurm.sbatch running the same on len(nodes) nodes.

    nodes: [{"ip": ..., "host": ...}, ...] in rank order; node 0 is the msrun master. A one-node CPU topology
    reads its port from $MASTER_PORT when set (default master_port). check: a command each node runs before
    msrun (`{node}` in it becomes the node's index); the node stops if it fails. workdir_from_script: the working
    directory of node_<k>.sh relative to the script's own directory (slurm.sbatch, which Slurm runs from a copy,
    still goes to `workdir`).
    """
    _check(nodes, workers_per_node, device, rank_table_file)
    args = script_args(command)
    world = workers_per_node * len(nodes)
    full_env = {"RANK_SIZE": str(world)}
    if device == "ascend":
        full_env["RANK_TABLE_FILE"] = str(rank_table_file)
    full_env.update(env or {})
    master = nodes[0]["ip"]
    table = str(rank_table_file) if device == "ascend" else None
    port_text = f"${{{PORT_VARIABLE}:-{master_port}}}"
    port = port_text if device == "cpu" and len(nodes) == 1 else master_port
    raw = {f"--master_port={port_text}": f'"--master_port={port_text}"'}

    def line(node_rank, master_addr=master) -> list[str]:
        return msrun_command(world, workers_per_node, master_addr, port, node_rank, log_dir, args,
                             rank_table_file=table, cluster_time_out=cluster_time_out, tail_worker_log=tail_worker_log)

    scripts = {}
    for k, node in enumerate(nodes):
        title = (f"node {k} of {len(nodes)} ({node.get('host') or node['ip']}): {workers_per_node} {device} workers, "
                 f"ranks {k * workers_per_node}..{(k + 1) * workers_per_node - 1} of {world}")
        lines = _preamble(title, python_bin_dir, workdir, full_env, workdir_from_script)
        if check:
            lines.append(_shell([a.replace("{node}", str(k)) for a in check], raw))
        lines.append("exec " + _shell(line(k), raw))
        scripts[f"node_{k}.sh"] = "\n".join(lines) + "\n"
    slurm_raw = {**raw, "--node_rank=$SLURM_NODEID": '--node_rank="$SLURM_NODEID"', "$SLURM_NODEID": '"$SLURM_NODEID"',
                 f"--master_addr=${MASTER_VARIABLE}": f'--master_addr="${MASTER_VARIABLE}"'}
    inner = "exec " + _shell(line("$SLURM_NODEID", f"${MASTER_VARIABLE}"), slurm_raw)
    if check:
        inner = _shell([a.replace("{node}", "$SLURM_NODEID") for a in check], slurm_raw) + " && " + inner
    sbatch = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={len(nodes)}",
              "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive"]
    sbatch += _preamble(f"{len(nodes)} nodes x {workers_per_node} {device} workers; node rank = SLURM_NODEID, "
                        f"master: the allocation's first node, port {master_port}", python_bin_dir, workdir,
                        full_env)[1:]
    sbatch += _slurm_master(master)
    sbatch.append("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c " + shlex.quote(inner))
    scripts["slurm.sbatch"] = "\n".join(sbatch) + "\n"
    return scripts


def _slurm_master(fallback: str) -> list[str]:
    """Lines that set the msrun master to the first node Slurm allocated (node rank 0), by address."""
    return ["# node rank 0 is the first node of the allocation: it runs msrun's scheduler",
            'first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)',
            f"address=$(getent ahostsv4 \"${{first:-{fallback}}}\" | awk 'NR == 1 {{print $1}}' || true)",
            f"export {MASTER_VARIABLE}=\"${{address:-{fallback}}}\""]


def write_launch_scripts(directory: str | Path, scripts: dict[str, str]) -> list[Path]:
    """Write each script atomically and make it executable."""
    paths = []
    for name, text in scripts.items():
        path = Path(directory) / name
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o755)
        paths.append(path)
    return paths
