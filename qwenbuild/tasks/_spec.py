"""A build task as data (inputs, outputs, manifest keys, toolchain) and its translation into a doit task."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from qwenbuild.errors import UserError
from qwenbuild.layout import Layout
from qwenbuild.lock import Lock
from qwenbuild.digests import file_digest, json_digest
from qwenbuild.store import atomic_path, write_seal


def toolchain(packages: tuple[str, ...]) -> dict[str, str]:
    """Versions of the libraries a task's output depends on: a change makes the task out of date."""
    out = {"python": platform.python_version()} if packages else {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclasses.dataclass
class Context:
    """What an action may see: its manifest slice, the layout, and the resolved model."""

    name: str
    values: dict
    layout: Layout
    manifest: object  # the loaded Manifest, for derived values (model config, paths) of declared keys only

    def __getitem__(self, key: str):
        return self.values[key]

    def path(self, key: str) -> Path | None:
        return self.manifest.path_of(key) if self.values.get(key) else None

    @contextlib.contextmanager
    def output_dir(self, final: Path):
        """A temporary directory promoted onto `final` with its member-digest manifest once the block succeeds."""
        with atomic_path(final, directory=True) as tmp:
            yield tmp
            write_seal(tmp)

    def output_file(self, final: Path):
        return atomic_path(final)


@dataclasses.dataclass
class TaskSpec:
    name: str
    doc: str
    action: Callable[[Context], None]
    keys: tuple[str, ...] = ()
    inputs: list[Path] = dataclasses.field(default_factory=list)
    outputs: list[Path] = dataclasses.field(default_factory=list)
    dir_outputs: list[Path] = dataclasses.field(default_factory=list)
    reports: list[Path] = dataclasses.field(default_factory=list)  # written, but timings make them unrepeatable
    packages: tuple[str, ...] = ()
    after: list[str] = dataclasses.field(default_factory=list)
    always: bool = False


def manifest_slice(manifest, keys: tuple[str, ...]) -> dict:
    return {key: manifest.get(key) if manifest.has(key) else None for key in keys}


def _input_digest(path: Path, lock: Lock, root: Path) -> str:
    return lock.digest_of(path, root) or file_digest(path)


def _run(spec: TaskSpec, manifest, layout: Layout, values: dict, versions: dict):
    try:
        return _run_recorded(spec, manifest, layout, values, versions)
    except UserError as exc:
        print(f"qwenbuild {spec.name}: error: {exc}", file=sys.stderr)
    except OSError as exc:  # e.g. a full disk while writing qwen.lock itself
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"qwenbuild {spec.name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return TaskFailed(f"{spec.name} stopped: see the message above")


def _inputs(spec: TaskSpec, lock: Lock, layout: Layout) -> dict[str, str]:
    return {str(Path(p).resolve().relative_to(layout.root) if Path(p).resolve().is_relative_to(layout.root)
                else Path(p).resolve()): _input_digest(Path(p), lock, layout.root) for p in spec.inputs}


def _recorded(spec: TaskSpec, lock: Lock, layout: Layout, values: dict, versions: dict) -> bool:
    """qwen.lock already holds this task built from these inputs and settings, with intact artifacts."""
    entry = lock.entry(spec.name)
    return (not spec.always and entry is not None and entry["inputs"] == _inputs(spec, lock, layout)
            and json_digest(entry["manifest"]) == json_digest(values) and entry["toolchain"] == versions
            and lock.intact(spec.name, layout.root) is None)


def _run_recorded(spec: TaskSpec, manifest, layout: Layout, values: dict, versions: dict):
    lock = Lock(layout.lock)
    if _recorded(spec, lock, layout, values, versions):
        # doit saves its own state only when a build ends: a killed build's finished tasks are kept from here
        print(f"qwenbuild {spec.name}: already built (qwen.lock), kept", file=sys.stderr)
        return None
    lock.forget(spec.name)  # from here until the new entry is written the old artifacts are not trusted
    started = time.monotonic()
    spec.action(Context(spec.name, values, layout, manifest))
    artifacts = spec.outputs + spec.dir_outputs
    missing = [p for p in artifacts if not p.exists()]
    if missing:
        return TaskFailed(f"{spec.name} did not produce {', '.join(map(str, missing))}")
    lock.record(spec.name, artifacts, _inputs(spec, lock, layout), values, versions, layout.root)
    print(f"qwenbuild {spec.name}: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return None


def to_doit(spec: TaskSpec, manifest, layout: Layout) -> dict:
    values = manifest_slice(manifest, spec.keys)
    versions = toolchain(spec.packages)
    lock = Lock(layout.lock)
    targets = [str(p) for p in spec.outputs] + [str(Layout.sealed(d)) for d in spec.dir_outputs]

    def intact(task, values):
        return lock.intact(spec.name, layout.root) is None

    task = {
        "basename": spec.name,
        "doc": spec.doc,
        "actions": [(_run, [spec, manifest, layout, values, versions])],
        "file_dep": [str(p) for p in spec.inputs],
        "targets": targets,
        "task_dep": list(spec.after),
        "verbosity": 2,
    }
    if spec.always:
        task["uptodate"] = [False]
    else:
        task["uptodate"] = [config_changed(json_digest({"manifest": values, "toolchain": versions})), intact]
    return task
