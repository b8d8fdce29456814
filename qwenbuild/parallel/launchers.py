"""Launch scripts from one hardware description: a shell script per node running msrun, and a Slurm sbatch script.

msrun gives every worker DEVICE_ID = its index on the node and RANK_ID = node_rank * local workers + index, the
numbering run_multinode.sh used; the scripts export RANK_SIZE, RANK_TABLE_FILE (Ascend) and the mode's variables.
"""

from __future__ import annotations

import os
import shlex
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


def mode_env(mode: str, device: str) -> dict[str, str]:
    """Environment the original sets for a run mode; CPU runs need none of the Ascend switches."""
    if mode not in MODE_ENV:
        raise UserError(f"unknown run mode {mode!r}", hint=f"use one of {', '.join(MODE_ENV)}")
    return dict(MODE_ENV[mode]) if device == "ascend" else {}


def _script_args(command: list[str] | str) -> list[str]:
    # msrun starts `python` itself: keep only the script and its arguments
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if args and os.path.basename(args[0]).startswith("python"):
        args = args[1:]
    if not args:
        raise UserError("the command to launch is empty", hint="give the python script and its arguments")
    return args


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


def _msrun_line(world: int, workers: int, master_addr: str, master_port: int, node_rank: str, log_dir: str,
                args: list[str], rank_table_file: str | None, cluster_time_out: int) -> str:
    parts = ["msrun", f"--worker_num={world}", f"--local_worker_num={workers}", f"--master_addr={master_addr}",
             f"--master_port={master_port}", f"--node_rank={node_rank}", f"--log_dir={shlex.quote(log_dir)}",
             "--join=True", f"--cluster_time_out={cluster_time_out}"]
    if rank_table_file:
        parts.append(f"--rank_table_file={shlex.quote(str(rank_table_file))}")
    return " ".join(parts + [shlex.quote(a) for a in args])


def _preamble(title: str, python_bin_dir, workdir, env: dict[str, str]) -> list[str]:
    lines = ["#!/usr/bin/env bash", f"# {title}", "set -euo pipefail"]
    if workdir:
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
                   job_name: str = "qwenbuild") -> dict[str, str]:
    """{file name: text}: node_<k>.sh for every node and slurm.sbatch running the same on len(nodes) nodes.

    nodes: [{"ip": ..., "host": ...}, ...] in rank order; node 0 is the msrun master.
    """
    _check(nodes, workers_per_node, device, rank_table_file)
    args = _script_args(command)
    world = workers_per_node * len(nodes)
    full_env = {"RANK_SIZE": str(world)}
    if device == "ascend":
        full_env["RANK_TABLE_FILE"] = str(rank_table_file)
    full_env.update(env or {})
    master = nodes[0]["ip"]
    table = str(rank_table_file) if device == "ascend" else None
    scripts = {}
    for k, node in enumerate(nodes):
        title = (f"node {k} of {len(nodes)} ({node.get('host') or node['ip']}): {workers_per_node} {device} workers, "
                 f"ranks {k * workers_per_node}..{(k + 1) * workers_per_node - 1} of {world}")
        lines = _preamble(title, python_bin_dir, workdir, full_env)
        lines.append("exec " + _msrun_line(world, workers_per_node, master, master_port, str(k), log_dir, args,
                                           table, cluster_time_out))
        scripts[f"node_{k}.sh"] = "\n".join(lines) + "\n"
    inner = _msrun_line(world, workers_per_node, master, master_port, '"$SLURM_NODEID"', log_dir, args, table,
                        cluster_time_out)
    sbatch = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={len(nodes)}",
              "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive"]
    sbatch += _preamble(f"{len(nodes)} nodes x {workers_per_node} {device} workers; node rank = SLURM_NODEID, "
                        f"master {master}:{master_port}", python_bin_dir, workdir, full_env)[1:]
    sbatch.append("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c " + shlex.quote("exec " + inner))
    scripts["slurm.sbatch"] = "\n".join(sbatch) + "\n"
    return scripts


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
