"""What dodo.py runs: load the manifest named on the doit command line, claim the build dir, return the tasks."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import sys
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.errors import UserError
from qwenbuild.lock import Lock
from qwenbuild.logs import configure
from qwenbuild.manifest import load_manifest
from qwenbuild.processes import stop_on_signals
from qwenbuild.store import sweep_stale
from qwenbuild.tasks import check_build_dir, task_groups, task_specs
from qwenbuild.tasks.doit_tasks import doit_tasks
from qwenbuild.tasks.staleness import producers, upstream

logger = logging.getLogger(__name__)

# doit commands that only read: they neither wait for nor block a running build
_READ_ONLY = {"list", "info", "help", "dumpdb", "strace", "tabcompletion", "ignore", "reset-dep", "clean"}
_VALUE_OPTIONS = {"-f", "--file", "-d", "--dir", "--db-file", "--backend", "--check_file_uptodate", "-k",
                  "--seek-file", "-n", "--process", "-P", "--parallel-type", "-r", "--reporter", "-o", "--output-file"}
_claims = []  # open claim files: the flock lasts as long as the process
DEFAULT_TASKS = ["finetune"]


def _words(argv: list[str]) -> list[str]:
    """The command and task names of a doit command line (options, their values and NAME=value left out)."""
    words, args = [], iter(argv[1:])
    for a in args:
        if a in _VALUE_OPTIONS:
            next(args, None)  # the option's value is not a command
        elif not a.startswith("-") and "=" not in a:
            words.append(a)
    return words


def _is_build(argv: list[str]) -> bool:
    words = _words(argv)
    return not words or words[0] not in _READ_ONLY


def forget_in_lock(argv: list[str], manifest, build: BuildDir, default: list[str]) -> None:
    """`doit forget` clears doit's own record, which qwenbuild's up-to-date check does not read: the tasks it names
    are taken out of qwen.lock too, so they run again (as `doit forget` promises). Unknown names forget nothing:
    doit reports them."""
    words = _words(argv)
    if not words or words[0] != "forget":
        return
    specs = {s.name: s for s in task_specs(manifest)}
    groups = {g.name: g.members for g in task_groups(manifest)}
    names = words[1:] or ([] if "--disable-default" in argv else default)
    if "-a" in argv or "--all" in argv:
        names = list(specs)
    if any(n not in specs and n not in groups for n in names):
        return
    chosen = [m for n in names for m in groups.get(n, [n])]
    if "-s" in argv or "--follow-sub" in argv:
        made_by = producers(list(specs.values()))
        todo = list(chosen)
        while todo:
            for up in upstream(specs[todo.pop()], made_by):
                if up not in chosen:
                    chosen.append(up)
                    todo.append(up)
    lock = Lock(build.lock)
    for name in dict.fromkeys(chosen):
        lock.forget(name)


def claim_build_dir(build: BuildDir) -> None:
    """One build at a time per build dir: a second one waits, saying for whom."""
    build.root.mkdir(parents=True, exist_ok=True)
    f = open(build.owner, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        logger.warning(f"qwenbuild: {build.root} is being built by {holder}; waiting for it to finish "
                       "(Ctrl-C to stop waiting)")
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _claims.append(f)
    # a build killed while writing qwen.lock or its stat cache leaves a temporary that no later write may sweep
    sweep_stale(build.lock)


def dodo_namespace(manifest_path: str, build_dir: str | None = None, argv: list[str] | None = None) -> dict:
    """DOIT_CONFIG and task creators for the manifest; a bad manifest exits 2 with every error listed."""
    argv = sys.argv if argv is None else argv
    stop_on_signals("qwenbuild")  # doit runs the tasks in this process: SIGTERM stops them as Ctrl-C does
    try:
        configure()  # QWENBUILD_LOG: doit's own -v and verbosity= are its output's, not qwenbuild's lines
        manifest = load_manifest(Path(manifest_path))
        if build_dir:  # `doit build_dir=...`: the same inputs built elsewhere (qwenbuild verify)
            manifest = dataclasses.replace(manifest, build=dataclasses.replace(manifest.build,
                                                                               dir=str(Path(build_dir).resolve())))
        build = BuildDir(manifest.build_dir)
        check_build_dir(manifest, task_specs(manifest))
        if _is_build(argv):
            claim_build_dir(build)
        else:
            build.root.mkdir(parents=True, exist_ok=True)
        Lock(build.lock).read()  # a damaged lock stops the build here, before doit asks any task if it is stale
        forget_in_lock(argv, manifest, build, DEFAULT_TASKS)
    except UserError as exc:
        logger.error(f"qwenbuild: error: {exc}")
        raise SystemExit(exc.exit_code)
    except OSError as exc:  # the build dir cannot be made or written (read-only, a file in the way, /proc)
        logger.error(f"qwenbuild: error: cannot use the build dir: {exc.filename}: {exc.strerror or exc}\n"
                     "  hint: set build.dir in qwen.toml (or doit build_dir=DIR) to a writable directory")
        raise SystemExit(2)
    namespace = doit_tasks(manifest)
    namespace["DOIT_CONFIG"] = {"dep_file": str(build.doit_db), "backend": "sqlite3", "verbosity": 2,
                                "default_tasks": DEFAULT_TASKS}
    return namespace
