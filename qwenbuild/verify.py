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
    machine: tuple[str, ...] = ()  # how the machine the task was recorded on differs from this one

    def __str__(self) -> str:
        text = (f"{self.task}: {self.artifact}\n    recorded {self.recorded}\n    rebuilt  {self.rebuilt}\n"
                f"    first difference: {self.where}")
        if self.machine:
            text += ("\n    recorded on another machine, whose kernels round differently: "
                     + "; ".join(self.machine))
        return text


CPU_LABELS = {"arch": "architecture", "model": "CPU", "cpus": "CPUs (kernel threads)",
              "extensions": "CPU extensions the kernels dispatch on"}
KERNEL_LABELS = {"compiler": "compiler", "march": "-march=native", "flags": "flags"}


def _extensions(a: list, b: list) -> str:
    parts = [f"{', '.join(x for x in a if x not in b)} recorded, not here" if set(a) - set(b) else "",
             f"{', '.join(x for x in b if x not in a)} here only" if set(b) - set(a) else ""]
    return " and ".join(p for p in parts if p)


def _kernel_changes(a: dict, b: dict) -> list[str]:
    if a.get("used") != b.get("used") or not a.get("used"):
        said = [f"built by {r.get('compiler')} for -march=native = {r.get('march')}" if r.get("used")
                else f"not used ({r.get('why', 'not recorded')})" for r in (a, b)]
        return [f"fused kernels: {said[0]} recorded, {said[1]} here"]
    return [f"fused kernels' {label}: {a.get(key)!r} recorded, {b.get(key)!r} here"
            for key, label in KERNEL_LABELS.items() if a.get(key) != b.get(key)]


def machine_changes(recorded: dict | None, here: dict | None) -> tuple[str, ...]:
    """What differs between the machine a task was recorded on and the one it was rebuilt on, in words."""
    if not here or recorded == here:
        return ()
    if recorded is None:
        return ("qwen.lock has no machine record for it (written before qwen.lock recorded machines)",)
    out = []
    cpu_a, cpu_b = recorded.get("cpu") or {}, here.get("cpu") or {}
    for key, label in CPU_LABELS.items():
        a, b = cpu_a.get(key), cpu_b.get(key)
        if a != b:
            out.append(f"{label}: " + (_extensions(a or [], b or []) if key == "extensions"
                                       else f"{a!r} recorded, {b!r} here"))
    kernels_a, kernels_b = recorded.get("fused_kernels") or {}, here.get("fused_kernels") or {}
    if kernels_a != kernels_b:
        out += _kernel_changes(kernels_a, kernels_b)
    return tuple(out)


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
    """Differences between two build dirs' locks, and how many artifacts were compared; a difference of a task
    recorded on another machine says how that machine differs."""
    a, b = Lock(BuildDir(a_root).lock).read()["tasks"], Lock(BuildDir(b_root).lock).read()["tasks"]
    diffs, count = [], 0
    for task, entry in sorted(a.items()):
        rebuilt = b.get(task, {})
        changes = machine_changes(entry.get("machine"), rebuilt.get("machine"))
        for rel, old in sorted(entry["artifacts"].items()):
            count += 1
            found = _compare_artifact(task, rel, old, rebuilt.get("artifacts", {}).get(rel), a_root, b_root)
            diffs += [dataclasses.replace(d, machine=changes) for d in found]
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
