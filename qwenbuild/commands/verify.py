"""Prove a build reproducible: rebuild every task recorded in <build dir>/qwen.lock into a fresh temporary
build dir from the same inputs, then compare every artifact's digest with the lock (MINDIR by a normalised
digest). Each difference is printed with the artifact, both digests and the first differing tensor, row or field,
and, for a task recorded on another machine, how that machine differs (CPU extensions, kernel threads, the fused
kernels' compiler and target). Exits 0 when everything matches, 1 otherwise."""

from __future__ import annotations

from qwenbuild.commands import add_manifest_argument
from qwenbuild.manifest import load_manifest
from qwenbuild.verify import verify


def add_arguments(parser):
    add_manifest_argument(parser)
    parser.add_argument("--keep", action="store_true", help="keep the fresh build dir for inspection")


def main(args):
    m = load_manifest(args.config)
    diffs, count = verify(m, keep=args.keep)
    for d in diffs:
        print(d)
    if diffs:
        print(f"verify: {len(diffs)} of {count} artifacts differ from {m.build_dir / 'qwen.lock'}")
        elsewhere = sorted({d.task for d in diffs if d.machine})
        if elsewhere:
            print(f"verify: {', '.join(elsewhere)} {'was' if len(elsewhere) == 1 else 'were'} recorded on another "
                  "machine (see above): a task's numbers follow the CPU and kernel build it ran on, so verify on "
                  "that machine to compare like with like")
        return 1
    print(f"verify: all {count} artifacts identical to {m.build_dir / 'qwen.lock'}")
    return 0
