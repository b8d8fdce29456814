"""Why a task must run: the one answer doit, `qwenbuild plan` and `qwenbuild verify` all use.

A task is up to date when qwen.lock holds an entry for it whose manifest slice, library versions and input digests
equal today's and whose artifacts still have the recorded bytes. Inputs made by another task are known by the
digest that task recorded; other input files by their digest, re-read only when their stat changed.

The machine a task ran on (its CPU's extensions and thread count, the fused kernels' compiler and target) is
recorded beside the versions but never makes a task out of date: a build dir copied to a cluster node, or moved to
another host, holds valid results of the same inputs, and rebuilding them there would discard finished training
for numbers equally valid. `qwenbuild verify` names the machine when a rebuild's digests differ.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.digests import file_digest, json_digest
from qwenbuild.lock import Lock, file_stat
from qwenbuild.store import member_digests
from qwenbuild.tasks import task_specs
from qwenbuild.tasks.spec import TaskSpec, recorded_slice, toolchain


def input_label(path: Path, root: Path, project: Path | None = None) -> str:
    """An input as qwen.lock names it: relative inside the build dir; relative to it too when both lie in the
    project (qwen.toml's directory), so a copied or moved project keeps its labels; else absolute."""
    path = Path(os.path.abspath(path))
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    if project is not None and path.is_relative_to(project) and Path(root).is_relative_to(project):
        return Path(os.path.relpath(path, root)).as_posix()
    return str(path)


def input_digests(spec: TaskSpec, root: Path, lock: Lock,
                  project: Path | None = None) -> tuple[dict[str, str | None], dict[str, list[int]]]:
    """({label: digest, None when missing}, stats of the input files read) for a task's inputs as they are now."""
    entry = lock.entry(spec.name) or {"inputs": {}}
    stats = lock.read_stats()
    digests, seen = {}, {}
    for path in spec.inputs:
        label = input_label(path, root, project)
        recorded = lock.digest_of(Path(path), root)
        if recorded is not None:
            digests[label] = recorded
        elif Path(path).is_file():
            stat = file_stat(Path(path))
            known = entry["inputs"].get(label)
            # an unchanged stat means the bytes hashed last time: no read
            digests[label] = known if known and stats.get(str(Path(path).resolve())) == stat else file_digest(path)
            seen[str(Path(path).resolve())] = stat
        elif Path(path).is_dir():
            digests[label] = json_digest(member_digests(path))
        else:
            digests[label] = None
    return digests, seen


def _changed(old: dict, new: dict, label: str) -> list[str]:
    return [f"{label}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def stale_reasons(spec: TaskSpec, manifest, root: Path, lock: Lock) -> list[str]:
    """Every reason the task must run; empty when it is up to date."""
    entry = lock.entry(spec.name)
    if entry is None:
        return ["not built yet"]
    reasons = _changed(entry["manifest"], recorded_slice(spec, manifest, root), "")
    reasons += _changed(entry["toolchain"], toolchain(spec.packages), "version of ")
    now, _ = input_digests(spec, root, lock, manifest.root)
    for label in sorted(set(now) | set(entry["inputs"])):
        if label not in entry["inputs"]:
            reasons.append(f"new input {label}")
        elif label not in now:
            reasons.append(f"input {label} is no longer used")
        elif now[label] is None:
            reasons.append(f"input {label} is missing")
        elif now[label] != entry["inputs"][label]:
            reasons.append(f"input {label} changed")
    broken = lock.intact(spec.name, root)
    if broken:
        reasons.append(broken)
    return reasons


def producers(specs: list[TaskSpec]) -> dict[str, str]:
    """Artifact path -> the task that makes it."""
    return {str(Path(os.path.abspath(p))): s.name for s in specs for p in s.artifacts}


def producer(path: Path, made_by: dict[str, str]) -> str | None:
    """The task whose artifact is `path`, or holds it (one file of a directory artifact)."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if str(candidate) in made_by:
            return made_by[str(candidate)]
    return None


def upstream(spec: TaskSpec, made_by: dict[str, str]) -> list[str]:
    """Tasks whose artifacts this task reads, in input order."""
    names = [producer(p, made_by) for p in spec.inputs]
    return list(dict.fromkeys(n for n in names if n and n != spec.name))


def build_order(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Every task after the tasks it reads from."""
    by_name, made_by = {s.name: s for s in specs}, producers(specs)
    order, seen = [], set()

    def visit(spec: TaskSpec) -> None:
        if spec.name in seen:
            return
        seen.add(spec.name)
        for name in upstream(spec, made_by):
            visit(by_name[name])
        order.append(spec)

    for spec in specs:
        visit(spec)
    return order


def task_status(manifest) -> list[tuple[str, str, list[str]]]:
    """(task, "up to date" | "will run", reasons) in build order, computed without running anything."""
    build = BuildDir(manifest.build_dir)
    lock = Lock(build.lock)
    specs = task_specs(manifest)
    made_by = producers(specs)
    out, running = [], set()
    for spec in build_order(specs):
        before = [name for name in upstream(spec, made_by) if name in running]
        reasons = (["after " + ", ".join(before)] if before else []) + stale_reasons(spec, manifest, build.root, lock)
        if reasons:
            running.add(spec.name)
        out.append((spec.name, "will run" if reasons else "up to date", reasons))
    return out
