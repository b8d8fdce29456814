"""Rebuild everything into a fresh build dir and compare every artifact digest with the original qwen.lock."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.compare import first_difference
from qwenbuild.errors import UserError
from qwenbuild.lock import Lock
from qwenbuild.processes import run_child
from qwenbuild.tasks.staleness import task_status

@dataclasses.dataclass
class Difference:
    task: str
    artifact: str
    recorded: str
    rebuilt: str
    where: str

    def __str__(self) -> str:
        return (f"{self.task}: {self.artifact}\n    recorded {self.recorded}\n    rebuilt  {self.rebuilt}\n"
                f"    first difference: {self.where}")


def rebuild(manifest_path: Path, build_dir: Path, tasks: list[str]) -> None:
    cmd = [sys.executable, "-m", "qwenbuild.tasks.run_doit", f"manifest={manifest_path}", f"build_dir={build_dir}",
           *tasks]
    proc = run_child(cmd, cwd=manifest_path.parent)
    if proc.returncode:
        raise UserError(f"the fresh rebuild in {build_dir} failed (doit exit {proc.returncode})",
                        hint="see the task output above")


def same_but_for_root(a: Path, b: Path, a_root: Path, b_root: Path) -> bool:
    """Launch scripts, run.json and the YAML name the build dir itself: compare with the rebuild's dir renamed."""
    try:
        old, new = a.read_bytes(), b.read_bytes()
    except OSError:
        return False
    if b"\0" in old or len(old) > 1 << 22:
        return False
    return new.replace(str(b_root).encode(), str(a_root).encode()) == old


def _compare_artifact(task, rel, old, new, a_root: Path, b_root: Path) -> list[Difference]:
    if new is None:
        return [Difference(task, rel, old["digest"], "(not rebuilt)", "missing from the rebuild")]
    if old["digest"] == new["digest"]:
        return []
    if old.get("kind") != "dir":
        if same_but_for_root(a_root / rel, b_root / rel, a_root, b_root):
            return []
        return [Difference(task, rel, old["digest"], new["digest"], first_difference(a_root / rel, b_root / rel))]
    out = []
    for member in sorted(set(old["members"]) | set(new["members"])):
        x, y = old["members"].get(member), new["members"].get(member)
        if x is None or y is None:
            out.append(Difference(task, f"{rel}/{member}", x or "(absent)", y or "(absent)",
                                  "present in only one build"))
        elif x != y and not same_but_for_root(a_root / rel / member, b_root / rel / member,
                                                                   a_root, b_root):
            out.append(Difference(task, f"{rel}/{member}", x, y,
                                  first_difference(a_root / rel / member, b_root / rel / member)))
    return out


def compare_locks(a_root: Path, b_root: Path) -> tuple[list[Difference], int]:
    """Differences between two build dirs' locks, and how many artifacts were compared."""
    a, b = Lock(BuildDir(a_root).lock).read()["tasks"], Lock(BuildDir(b_root).lock).read()["tasks"]
    diffs, count = [], 0
    for task, entry in sorted(a.items()):
        rebuilt = b.get(task, {}).get("artifacts", {})
        for rel, old in sorted(entry["artifacts"].items()):
            count += 1
            diffs += _compare_artifact(task, rel, old, rebuilt.get(rel), a_root, b_root)
    return diffs, count


def verify(manifest, keep: bool = False) -> tuple[list[Difference], int]:
    original = BuildDir(manifest.build_dir)
    recorded = Lock(original.lock).read()["tasks"]
    if not recorded:
        raise UserError(f"{original.lock} records no artifacts yet", hint="build first, e.g. `doit export`")
    status = [(name, reasons) for name, state, reasons in task_status(manifest) if name in recorded]
    stale = [f"{name}: {'; '.join(reasons)}" for name, reasons in status if reasons]
    if stale:
        raise UserError(f"the build in {original.root} is out of date, so qwen.lock does not describe "
                        "qwen.toml:\n  " + "\n  ".join(stale), hint=f"rebuild first: doit {' '.join(n for n, _ in status)}")
    tasks = [name for name, _ in status]
    scratch = Path(tempfile.mkdtemp(prefix="qwenbuild-verify-", dir=os.environ.get("QWENBUILD_VERIFY_DIR")))
    print(f"verify: rebuilding {', '.join(tasks)} into {scratch}", file=sys.stderr, flush=True)
    try:
        rebuild(manifest.path, scratch, tasks)
        return compare_locks(original.root, scratch)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
