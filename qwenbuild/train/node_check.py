"""Before a node starts its workers: is it the node qwen.toml names, does it run the versions the build host
recorded, and does it see the artifacts qwen.lock recorded, with the recorded bytes?

`python -m qwenbuild.train.node_check --build_dir DIR --node K --host H --ip IP --workers N --toolchain_of TASK
ARTIFACT...` (the launch scripts run it ahead of msrun, on the nodes' own Python). Every node reads the build dir
at the build host's path, so the nodes share it (a shared filesystem) or carry identical copies; a machine that is
not node K's host and address, a qwenbuild, MindSpore or MindFormers whose version differs from the one TASK's
lock entry records, or a missing or different file stops this node in seconds, naming the node and what differs,
instead of a job that fails, or trains on other data or other ranks, after it has queued.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.errors import UserError
from qwenbuild.lock import Lock, check_artifact
from qwenbuild.logs import configure, entry_logger
from qwenbuild.parallel.hosts import identity_problem

# started as `python -m`, this module is __main__: its lines go under its package name all the same
logger = entry_logger(__file__)

# the packages whose versions a node must share with the build host, when the lock records them
NODE_PACKAGES = ("qwenbuild", "mindspore", "mindformers")

ERROR = "qwenbuild node_check:"


def _rank_members(entry: dict, first: int, last: int) -> dict:
    """A per-rank directory artifact narrowed to this node's ranks (rank_N/...)."""
    keep = {rel: d for rel, d in entry["members"].items()
            if not rel.startswith("rank_") or first <= int(rel.split("/")[0][5:]) <= last}
    return {"kind": "dir", "members": keep}


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def version_problems(lock: Lock, task: str) -> list[str]:
    """Each node package whose version here differs from the one `task`'s lock entry records."""
    entry = lock.entry(task)
    if entry is None:
        return [f"{lock.path} has no entry for the {task} task: build it on the build host first"]
    recorded = entry.get("toolchain", {})
    return [f"{package} is {installed_version(package)} here, but qwen.lock's {task} task was built with "
            f"{recorded[package]} (this node's Python: {sys.executable}); install the same version, or point "
            "hardware.python / hardware.env_script at an environment that has it"
            for package in NODE_PACKAGES if package in recorded and installed_version(package) != recorded[package]]


def problems(build: BuildDir, artifacts: list[str], ranks: tuple[int, int]) -> list[str]:
    lock = Lock(build.lock)
    recorded = {rel: art for entry in lock.read()["tasks"].values() for rel, art in entry["artifacts"].items()}
    # the same file the build host recorded (a shared filesystem) is trusted by its stat; a copy is read
    stats = lock.read_stats()
    out = []
    for rel in artifacts:
        entry = recorded.get(rel)
        if entry is None:
            out.append(f"{build.root / rel} is not in {build.lock}: build it on the build host first")
            continue
        path = build.root / rel
        if entry.get("kind") == "dir":
            for member, digest in _rank_members(entry, *ranks)["members"].items():
                reason = check_artifact(path / member, {"kind": "file", "digest": digest}, stats)
                if reason:
                    out.append(reason)
        else:
            reason = check_artifact(path, entry, stats)
            if reason:
                out.append(reason)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenbuild.train.node_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build_dir", required=True)
    parser.add_argument("--node", required=True, type=int, help="this node's index in hardware.nodes")
    parser.add_argument("--host", help="hardware.nodes[K].host: this machine's name")
    parser.add_argument("--ip", help="hardware.nodes[K].ip: an address of this machine")
    parser.add_argument("--workers", required=True, type=int, help="workers per node: node K runs ranks K*N..K*N+N-1")
    parser.add_argument("--toolchain_of", help="the task whose recorded qwenbuild, MindSpore and MindFormers "
                                               "versions this node must run")
    parser.add_argument("artifacts", nargs="+", help="artifact paths as qwen.lock names them (relative)")
    args = parser.parse_args(argv)
    try:
        return _check_node(args)
    except UserError as exc:  # a damaged lock: named, no traceback
        logger.error(f"{ERROR} node {args.node}: {exc}")
        return 2


def _check_node(args) -> int:
    if args.host and args.ip:
        wrong = identity_problem(args.host, args.ip)
        if wrong:
            logger.error(f"{ERROR} node {args.node}: this machine is not hardware.nodes[{args.node}] (host "
                         f"{args.host}, ip {args.ip}): {wrong}; start node_{args.node}.sh on {args.host}, or correct "
                         "hardware.nodes in qwen.toml")
            return 2
    first = args.node * args.workers
    who = f"node {args.node}" + (f" ({args.host})" if args.host else "")
    build = BuildDir(Path(args.build_dir).resolve())  # the scripts pass "." (the build dir they lie in)
    found = version_problems(Lock(build.lock), args.toolchain_of) if args.toolchain_of else []
    for problem in found:
        logger.error(f"{ERROR} {who}: {problem}")
    if found:
        return 2
    found = problems(build, args.artifacts, (first, first + args.workers - 1))
    for problem in found:
        logger.error(f"{ERROR} {who}: {problem}")
    if found:
        logger.error(f"{ERROR} node {args.node} does not see the build host's {build.root} as it was built: every "
                     "node needs the build dir with the same bytes (a shared filesystem, or identical copies); "
                     "node_K.sh reads it where the script lies, slurm.sbatch at the build host's path")
        return 2
    versions = ", ".join(f"{p} {installed_version(p)}" for p in NODE_PACKAGES)
    print(f"node_check: {who} sees {len(args.artifacts)} artifacts as qwen.lock records them; {versions} on "
          f"{sys.executable}", flush=True)
    return 0


if __name__ == "__main__":
    configure()  # this process's lines in its msrun log, at the level QWENBUILD_LOG asks for
    sys.exit(main())
