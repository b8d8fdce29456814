"""Launch scripts from one hardware description: a shell script per node running msrun, and a Slurm sbatch script.

msrun gives every worker DEVICE_ID = its index on the node and RANK_ID = node_rank * local workers + index, the
numbering run_multinode.sh used; the scripts export RANK_SIZE, RANK_TABLE_FILE (Ascend) and the mode's variables.
The scripts run on the nodes' own Python (`hardware.python`, after `hardware.env_script`), never a path of the
build host: qwenbuild's entry points and msrun run as modules of it, and its directory goes first on PATH, where
msrun finds the `python3` (or `python`) it starts the workers with. Every value goes through `shell.word`.
The msrun command line is written here only: the scripts, `doit finetune` and `qwenbuild finetune` all use it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.shell import Code, comment, host_name, ipv4, word, words
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
# msrun itself, run as a module of the nodes' Python (the `msrun` command is this module's console script)
MSRUN_MODULE = "mindspore.parallel.cluster.run"
# the names msrun starts a worker by (any other task script is run as `python SCRIPT`)
PYTHON_NAMES = ("python3", "python")


def mode_env(mode: str, device: str) -> dict[str, str]:
    """Environment the original sets for a run mode; CPU runs need none of the Ascend switches."""
    if mode not in MODE_ENV:
        raise UserError(f"unknown run mode {mode!r}", hint=f"use one of {', '.join(MODE_ENV)}")
    return dict(MODE_ENV[mode]) if device == "ascend" else {}


def script_args(command: list[str] | str) -> list[str]:
    """What a worker runs after `python`: a script and its arguments, or `-m module ...`; a leading python is
    dropped (msrun starts the workers' python itself)."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if args and os.path.basename(args[0]).startswith("python"):
        args = args[1:]
    if not args:
        raise UserError("the command to launch is empty", hint="give the python script or -m module and its arguments")
    return args


def _flag(name: str, value) -> str:
    return Code(f"--{name}={value}") if isinstance(value, Code) else f"--{name}={value}"


def msrun_command(world: int, local_workers: int, master_addr: str, master_port: int | str, node_rank: int | str,
                  log_dir: str | Path, args: list[str], *, rank_table_file: str | Path | None = None,
                  cluster_time_out: int = 600, tail_worker_log: int | None = None) -> list[str]:
    """msrun's argv for one node; tail_worker_log = local_workers + 1 keeps msrun from tailing worker logs."""
    argv = ["msrun", f"--worker_num={world}", f"--local_worker_num={local_workers}", _flag("master_addr", master_addr),
            _flag("master_port", master_port), _flag("node_rank", node_rank), f"--log_dir={log_dir}", "--join=True",
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


def python_name(python: str) -> str:
    """The name msrun starts workers by: the last part of hardware.python (`python3` or `python`)."""
    name = python.rsplit("/", 1)[-1]
    if name not in PYTHON_NAMES or "/" in python and not python.startswith("/"):
        raise UserError(f"python {python!r} must be python3 or python, or an absolute path ending in one of them",
                        hint="msrun starts its workers as python3 or python from PATH")
    return name


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
        ipv4(node["ip"])
        host_name(node.get("host") or node["ip"])
    if device == "ascend" and not rank_table_file:
        raise UserError("an Ascend topology needs the RANK_TABLE_FILE path")


def _environment(script: str, python: str, env_script: str | None, env: dict[str, str]) -> list[str]:
    """Lines that set up a node: its environment script, its Python first on PATH, the run's variables."""
    python_name(python)  # refuses what msrun could not start
    lines = []
    if env_script:
        # an environment script may read unset variables: -u only around it
        lines += ["set +u", f"source {word(env_script)}", "set -u"]
    missing = f"{script}: hardware.python {python} is not found on this node; PATH:"
    lines += [f'python=$(command -v {word(python)}) || {{ echo {word(missing)} "$PATH" >&2; exit 127; }}',
              'export PATH="${python%/*}:$PATH"']
    lines += [f"export {k}={word(v)}" for k, v in env.items()]
    lines.append("ulimit -u unlimited 2>/dev/null || true")
    return lines


def _python_comment(python: str) -> str:
    return comment(f"the nodes' own Python (hardware.python {word(python)}), its directory first on PATH: msrun "
                   f"starts the workers as {python_name(python)} from there")


def launch_scripts(nodes: list[dict], workers_per_node: int, command: list[str] | str, *, device: str = "cpu",
                   master_port: int = 8118, log_dir: str = "output/msrun_log", env: dict[str, str] | None = None,
                   python: str = "python3", env_script: str | None = None,
                   rank_table_file: str | Path | None = None, workdir: str | Path | None = None,
                   cluster_time_out: int = 600, tail_worker_log: int | None = None, check: list[str] | None = None,
                   job_name: str = "qwenbuild", workdir_from_script: str | None = None) -> dict[str, str]:
    """{file name: text}: node_<k>.sh for every node and slurm.sbatch running the same on the same hosts.

    nodes: [{"ip": ..., "host": ...}, ...] in rank order; node 0 is the msrun master. command: what each worker
    runs after the nodes' python (`-m module args...` or a script and its arguments). A one-node CPU topology reads
    its port from $MASTER_PORT when set (default master_port). check: a module and its arguments each node runs on
    its python before msrun (arguments `{node}`, `{host}`, `{ip}` become the node's index, host and address); the
    node stops if it fails. workdir_from_script: the working directory of node_<k>.sh relative to the script's own
    directory, so a copied build dir moves along (slurm.sbatch, which Slurm runs from a copy, still goes to
    `workdir`).
    """
    _check(nodes, workers_per_node, device, rank_table_file)
    name = python_name(python)
    args = [name] + script_args(command)
    world = workers_per_node * len(nodes)
    full_env = {"RANK_SIZE": str(world)}
    if device == "ascend":
        full_env["RANK_TABLE_FILE"] = str(rank_table_file)
    full_env.update(env or {})
    hosts = [n.get("host") or n["ip"] for n in nodes]
    master = nodes[0]["ip"]
    table = str(rank_table_file) if device == "ascend" else None
    port = Code(f'"${{{PORT_VARIABLE}:-{master_port}}}"') if device == "cpu" and len(nodes) == 1 else master_port

    def run_lines(node, host, ip) -> list[str]:
        lines = []
        if check:
            fill = {"{node}": node, "{host}": host, "{ip}": ip}
            lines.append(words([name, "-m"] + [fill.get(a, a) for a in check]))
        msrun = msrun_command(world, workers_per_node, master, port, node, log_dir, args, rank_table_file=table,
                              cluster_time_out=cluster_time_out, tail_worker_log=tail_worker_log)
        lines.append("exec " + words([name, "-m", MSRUN_MODULE] + msrun[1:]))
        return lines

    head = ["set -euo pipefail"] + ([f"cd {word(workdir)}"] if workdir else [])
    # the directory found from where the script lies, so a copied build dir moves along
    node_head = head if workdir_from_script is None else [
        "set -euo pipefail", f'cd "$(dirname -- "${{BASH_SOURCE[0]}}")"/{word(workdir_from_script)}']
    scripts = {}
    for k, node in enumerate(nodes):
        title = (f"node {k} of {len(nodes)} ({word(hosts[k])}, {word(node['ip'])}): {workers_per_node} {device} "
                 f"workers, ranks {k * workers_per_node}..{(k + 1) * workers_per_node - 1} of {world}")
        lines = ["#!/usr/bin/env bash", comment(title), *node_head, _python_comment(python),
                 *_environment(f"node_{k}.sh", python, env_script, full_env), *run_lines(k, hosts[k], node["ip"])]
        scripts[f"node_{k}.sh"] = "\n".join(lines) + "\n"
    node_lines = _environment("slurm.sbatch", python, env_script, full_env)
    node_lines += run_lines(Code('"$node"'), Code('"$host"'), Code('"$ip"'))
    scripts["slurm.sbatch"] = _sbatch(nodes, hosts, workers_per_node, device, python, job_name, master_port, head,
                                      node_lines)
    return scripts


def _sbatch(nodes, hosts, workers_per_node, device, python, job_name, master_port, head: list[str],
            node_lines: list[str]) -> str:
    """slurm.sbatch: the hosts pinned in rank order; on each node, that node's environment and its rank from its
    own name's place in hardware.nodes (Slurm's SLURM_NODEID follows Slurm's node order, not qwen.toml's)."""
    arms = " ".join(f"{word(h)}) node={k} host={word(h)} ip={word(n['ip'])} ;;"
                    for k, (h, n) in enumerate(zip(hosts, nodes)))
    unknown = f"slurm.sbatch: this Slurm node is none of hardware.nodes ({', '.join(hosts)}):"
    case = (f'case "${{SLURMD_NODENAME:-}}" in {arms} *) echo {word(unknown)} "${{SLURMD_NODENAME:-}}" >&2; exit 2 ;; '
            "esac")
    inner = "; ".join(["set -euo pipefail", case] + node_lines)
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={word(job_name)}", f"#SBATCH --nodes={len(nodes)}",
             f"#SBATCH --nodelist={','.join(word(h) for h in hosts)}", "#SBATCH --ntasks-per-node=1",
             "#SBATCH --exclusive",
             comment(f"{len(nodes)} nodes x {workers_per_node} {device} workers on the hosts of hardware.nodes, "
                     f"node rank = the host's place there; msrun master {word(hosts[0])} {word(nodes[0]['ip'])} "
                     f"port {master_port}"),
             _python_comment(python), *head,
             "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c " + word(inner)]
    return "\n".join(lines) + "\n"


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
