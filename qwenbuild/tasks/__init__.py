"""The build graph: one TaskSpec per artifact, assembled from the manifest; doit_tasks hands them to doit."""

from __future__ import annotations

from qwenbuild.build_dir import BuildDir
from qwenbuild.tasks import data, deploy, distributed, train, weights
from qwenbuild.tasks.spec import Group, TaskSpec


def task_specs(manifest) -> list[TaskSpec]:
    build = BuildDir(manifest.build_dir)
    specs = []
    for area in (data, weights, distributed, train, deploy):
        specs += area.specs(manifest, build)
    return specs


def task_groups(manifest) -> list[Group]:
    return deploy.groups(manifest)
