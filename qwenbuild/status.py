"""Which build tasks are out of date and why, computed without running anything."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.layout import Layout
from qwenbuild.lock import Lock


def _changed_keys(old: dict, new: dict, label: str) -> list[str]:
    return [f"{label}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def task_status(manifest) -> list[tuple[str, str, list[str]]]:
    """(task, "up to date" | "will run", reasons) in build order."""
    from doit.dependency import Dependency, SqliteDB
    from doit.loader import load_tasks

    from qwenbuild.tasks import doit_tasks, task_specs
    from qwenbuild.tasks._spec import manifest_slice, toolchain

    layout = Layout(manifest.build_dir)
    lock = Lock(layout.lock)
    specs = {s.name: s for s in task_specs(manifest)}
    tasks = {t.name: t for t in load_tasks(doit_tasks(manifest))}
    producers = {}
    for t in tasks.values():
        for target in t.targets:
            producers[str(Path(target))] = t.name
    dep = Dependency(SqliteDB, str(layout.doit_db)) if layout.doit_db.exists() else None
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for f in tasks[name].file_dep:
            if f in producers:
                visit(producers[f])
        for d in tasks[name].task_dep:
            visit(d)
        order.append(name)

    for name in tasks:
        visit(name)
    out, running = [], set()
    for name in order:
        spec, task = specs[name], tasks[name]
        entry = lock.entry(name)
        reasons = []
        upstream = sorted({producers[f] for f in task.file_dep if producers.get(f) in running} |
                          {d for d in task.task_dep if d in running})
        if upstream:
            reasons.append("after " + ", ".join(upstream))
        if entry is None:
            reasons.append("not built yet")
        else:
            reasons += _changed_keys(entry["manifest"], manifest_slice(manifest, spec.keys), "")
            reasons += _changed_keys(entry["toolchain"], toolchain(spec.packages), "version of ")
            broken = lock.intact(name, layout.root)
            if broken:
                reasons.append(broken)
            if dep is not None and not reasons:
                status = dep.get_status(task, tasks, get_log=True)
                for f in status.reasons.get("changed_file_dep", []):
                    reasons.append(f"input {f} changed")
                for f in status.reasons.get("missing_file_dep", []):
                    reasons.append(f"input {f} is missing")
        if spec.always:
            reasons.append("runs every time")
        if reasons:
            running.add(name)
        out.append((name, "will run" if reasons else "up to date", reasons))
    return out
