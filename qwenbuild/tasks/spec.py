"""A build task as data: what it reads (inputs, manifest keys, library versions), what it writes, how it runs."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path
from typing import Callable

from qwenbuild.machine import cpu_record
from qwenbuild.model.fused_kernels import build_record


@dataclasses.dataclass
class TaskSpec:
    name: str
    doc: str
    action: Callable  # action(ctx: Context) -> None
    keys: tuple[str, ...] = ()  # the qwen.toml keys (or whole sections) the action reads
    inputs: list[Path] = dataclasses.field(default_factory=list)  # files, or artifacts of other tasks
    outputs: list[Path] = dataclasses.field(default_factory=list)
    dir_outputs: list[Path] = dataclasses.field(default_factory=list)
    reports: list[Path] = dataclasses.field(default_factory=list)  # written, but timings make them unrepeatable
    packages: tuple[str, ...] = ()  # libraries whose version the outputs depend on, beyond EVERY_TASK's
    # an output names the build dir's absolute path (slurm.sbatch): built elsewhere, or in a copy, it is stale
    names_build_dir: bool = False
    machine: tuple[str, ...] = ()  # what of this machine its outputs' floats depend on: "cpu", "fused_kernels"

    @property
    def artifacts(self) -> list[Path]:
        return self.outputs + self.dir_outputs


@dataclasses.dataclass
class Group:
    """A name for several tasks (`doit export` builds the graphs and lite.ini); it reads and writes nothing itself."""

    name: str
    doc: str
    members: list[str]


def manifest_slice(manifest, keys: tuple[str, ...]) -> dict:
    """The values of a task's declared keys; a key the schema does not define is an error, never a silent None."""
    return {key: manifest.value(key) for key in keys}


BUILD_PATH = "build dir (absolute path)"


def recorded_slice(spec: TaskSpec, manifest, root: Path) -> dict:
    """What qwen.lock records of the manifest for a task: its keys, and the build dir's path when an output names
    it."""
    values = manifest_slice(manifest, spec.keys)
    if spec.names_build_dir:
        values[BUILD_PATH] = str(Path(root))
    return values


# every task reads qwen.toml (tomlkit, jsonschema) and is run by doit
EVERY_TASK = ("doit", "jsonschema", "tomlkit")


def toolchain(packages: tuple[str, ...]) -> dict[str, str]:
    """Versions of the libraries a task's output depends on: a change makes the task out of date."""
    out = {"python": platform.python_version()}
    for name in sorted(set(EVERY_TASK) | set(packages)):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


MACHINE_PARTS = {"cpu": cpu_record, "fused_kernels": build_record}


def machine(parts: tuple[str, ...]) -> dict:
    """What of this machine a task's numbers depend on, as qwen.lock records it. Unlike a version, a difference never
    makes a task out of date (a build copied to a cluster node must not rebuild there); `qwenbuild verify` names it
    when digests differ."""
    return {part: MACHINE_PARTS[part]() for part in parts}
