"""The build graph: one TaskSpec per artifact, assembled from the manifest; doit_tasks hands them to doit."""

from __future__ import annotations

import os
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.errors import UserError
from qwenbuild.store import refuse_inputs
from qwenbuild.tasks import data, deploy, distributed, train, weights
from qwenbuild.tasks.spec import Group, TaskSpec

# files only qwenbuild puts in a build dir: one of them marks a directory as a build dir
BUILD_MARKS = ("qwen.lock", ".build-owner", ".doit.db")


def task_specs(manifest) -> list[TaskSpec]:
    build = BuildDir(manifest.build_dir)
    specs = []
    for area in (data, weights, distributed, train, deploy):
        specs += area.specs(manifest, build)
    return specs


def task_groups(manifest) -> list[Group]:
    return deploy.groups(manifest)


def check_build_dir(manifest, specs: list[TaskSpec]) -> None:
    """The build dir is empty, new or a build dir already, holds neither qwen.toml nor an input the manifest names,
    and no artifact is, holds or lies inside such an input: a build replaces only what qwenbuild wrote."""
    build = BuildDir(manifest.build_dir)
    refuse_inputs(build.root, [manifest.path])
    if build.root.is_dir() and not any((build.root / mark).exists() for mark in BUILD_MARKS):
        entries = sorted(os.listdir(build.root))
        if entries:
            shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
            raise UserError(f"build.dir {build.root} already holds files qwenbuild did not write ({shown})",
                            hint="set build.dir in qwen.toml to a new or empty directory (or a subdirectory of "
                                 "this one)")
    made = [Path(os.path.abspath(p)) for spec in specs for p in spec.artifacts]
    given = {Path(os.path.abspath(p)) for spec in specs for p in spec.inputs}
    outside = sorted(p for p in given if not any(p == a or a in p.parents for a in made))
    for artifact in made:
        refuse_inputs(artifact, outside)
