"""The build graph: one TaskSpec per artifact, assembled from the manifest and handed to doit by dodo.py."""

from __future__ import annotations

from qwenbuild.layout import Layout
from qwenbuild.tasks._spec import TaskSpec, to_doit


def task_specs(manifest) -> list[TaskSpec]:
    from qwenbuild.tasks import data, deploy, distributed, train, weights

    layout = Layout(manifest.build_dir)
    specs = []
    for module in (data, weights, distributed, train, deploy):
        specs += module.specs(manifest, layout)
    return specs


def doit_tasks(manifest) -> dict:
    """`task_<name>` creators for doit, each with the task's one-line doc as its docstring."""
    layout = Layout(manifest.build_dir)
    creators = {}
    for spec in task_specs(manifest):
        def creator(spec=spec):
            return to_doit(spec, manifest, layout)

        creator.__doc__ = spec.doc
        creator.__name__ = f"task_{spec.name}"
        creators[creator.__name__] = creator
    return creators
