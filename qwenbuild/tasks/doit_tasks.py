"""TaskSpecs as doit tasks: ordered by what they read, up to date by staleness.stale_reasons, run and recorded."""

from __future__ import annotations

import logging
import time

from doit.exceptions import TaskFailed

from qwenbuild.build_dir import BuildDir
from qwenbuild.errors import UserError, os_error_text
from qwenbuild.lock import Lock
from qwenbuild.processes import interrupted_line, interruption
from qwenbuild.store import seal_path
from qwenbuild.tasks import task_groups, task_specs
from qwenbuild.tasks.context import Context, DeclaredManifest
from qwenbuild.tasks.spec import TaskSpec, machine, recorded_slice, toolchain
from qwenbuild.tasks.staleness import input_digests, producers, stale_reasons, task_status, upstream

logger = logging.getLogger(__name__)


def run_task(spec: TaskSpec, manifest, build: BuildDir):
    """doit's action: run the task, then record it in qwen.lock; a UserError or OSError fails it with its message,
    SIGINT or SIGTERM ends the build with one line."""
    try:
        return _run(spec, manifest, build)
    except BaseException as exc:
        if (stop := interruption(exc)) is not None:
            logger.warning(interrupted_line(f"qwenbuild {spec.name}"))
            # doit closes its database on the way out; no later task runs and doit prints no traceback
            raise SystemExit(stop.exit_code) from None
        if not isinstance(exc, (UserError, OSError)):
            raise
        # an OSError is e.g. a full disk while writing qwen.lock itself
        text = str(exc) if isinstance(exc, UserError) else os_error_text(exc)
        logger.error(f"qwenbuild {spec.name}: error: {text}")
    return TaskFailed(f"{spec.name} stopped: see the message above")


def _run(spec: TaskSpec, manifest, build: BuildDir):
    lock = Lock(build.lock)
    reasons = stale_reasons(spec, manifest, build.root, lock)
    logger.info(f"qwenbuild {spec.name}: runs because {'; '.join(reasons)}")
    lock.forget(spec.name)  # from here until the new entry is written the old artifacts are not trusted
    inputs, input_stats = input_digests(spec, build.root, lock, manifest.root)
    missing = [label for label, digest in inputs.items() if digest is None]
    logger.debug(f"qwenbuild {spec.name}: inputs " + (", ".join(f"{label} {str(digest)[:12]}"
                                                             for label, digest in inputs.items()) or "none"))
    if missing:
        raise UserError(f"input {', '.join(missing)} does not exist", hint="build the tasks it comes from first")
    started = time.monotonic()
    spec.action(Context(spec.name, DeclaredManifest(manifest, spec.name, spec.keys), build))
    absent = [p for p in spec.artifacts if not p.exists()]
    if absent:
        return TaskFailed(f"{spec.name} did not produce {', '.join(map(str, absent))}")
    lock.record(spec.name, spec.artifacts, inputs, recorded_slice(spec, manifest, build.root),
                toolchain(spec.packages), build.root, input_stats, machine(spec.machine))
    logger.info(f"qwenbuild {spec.name}: done in {time.monotonic() - started:.1f} s")
    return None


def to_doit(spec: TaskSpec, manifest, build: BuildDir, after: list[str]) -> dict:
    lock = Lock(build.lock)

    def up_to_date():
        return not stale_reasons(spec, manifest, build.root, lock)

    return {
        "basename": spec.name,
        "doc": spec.doc,
        "actions": [(run_task, [spec, manifest, build])],
        "task_dep": after,
        "targets": [str(p) for p in spec.outputs] + [str(seal_path(d)) for d in spec.dir_outputs],
        "uptodate": [up_to_date],
        "verbosity": 2,
    }


def members_to_run(manifest, group) -> list[str]:
    """The members of a group that would run now, themselves or after a task they read from."""
    return [name for name, status, _ in task_status(manifest) if name in group.members and status == "will run"]


def doit_tasks(manifest) -> dict:
    """`task_<name>` creators for doit, each with the task's one-line doc as its docstring."""
    build = BuildDir(manifest.build_dir)
    specs = task_specs(manifest)
    made_by = producers(specs)
    creators = {}
    for spec in specs:
        def creator(spec=spec):
            return to_doit(spec, manifest, build, upstream(spec, made_by))

        creator.__doc__ = spec.doc
        creator.__name__ = f"task_{spec.name}"
        creators[creator.__name__] = creator
    for group in task_groups(manifest):
        def creator(group=group):
            # doit runs the members first; the group is out of date (`doit list --status`) while one would run
            return {"basename": group.name, "doc": group.doc, "actions": None, "task_dep": list(group.members),
                    "uptodate": [lambda: not members_to_run(manifest, group)]}

        creator.__doc__ = group.doc
        creator.__name__ = f"task_{group.name}"
        creators[creator.__name__] = creator
    return creators
