"""Before a node starts its workers: does it see the artifacts qwen.lock recorded, with the recorded bytes?

`python -m qwenbuild.train.node_check --build_dir DIR --node K --workers N ARTIFACT...` (the launch scripts run it
ahead of msrun). Every node reads the build dir at the build host's path, so the nodes share it (a shared
filesystem) or carry identical copies; a missing or different file stops this node in seconds, naming the file
and the node, instead of a job that fails or trains on other data after it has queued.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.lock import Lock, check_artifact

ERROR = "qwenbuild node_check:"


def _rank_members(entry: dict, first: int, last: int) -> dict:
    """A per-rank directory artifact narrowed to this node's ranks (rank_N/...)."""
    keep = {rel: d for rel, d in entry["members"].items()
            if not rel.startswith("rank_") or first <= int(rel.split("/")[0][5:]) <= last}
    return {"kind": "dir", "members": keep}


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
    parser.add_argument("--node", required=True, help="this node's index in hardware.nodes")
    parser.add_argument("--workers", required=True, type=int, help="workers per node: node K runs ranks K*N..K*N+N-1")
    parser.add_argument("artifacts", nargs="+", help="artifact paths as qwen.lock names them (relative)")
    args = parser.parse_args(argv)
    first = int(args.node) * args.workers
    build = BuildDir(Path(args.build_dir).resolve())  # the scripts pass "." (the build dir they lie in)
    found = problems(build, args.artifacts, (first, first + args.workers - 1))
    for problem in found:
        print(f"{ERROR} node {args.node}: {problem}", file=sys.stderr)
    if found:
        print(f"{ERROR} node {args.node} does not see the build host's {build.root} as it was built: every node "
              "needs the build dir at the same path, with the same bytes (a shared filesystem, or identical copies)",
              file=sys.stderr)
        return 2
    print(f"node_check: node {args.node} sees {len(args.artifacts)} artifacts as qwen.lock records them", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
