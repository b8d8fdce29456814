"""What dodo.py runs: load the manifest named on the doit command line, hold the build dir, return the tasks."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.layout import Layout
from qwenbuild.store import sweep_stale

# doit commands that only read: they neither wait for nor block a running build
_READ_ONLY = {"list", "info", "help", "dumpdb", "strace", "tabcompletion", "forget", "ignore", "reset-dep", "clean"}
_held = []


_VALUE_OPTIONS = {"-f", "--file", "-d", "--dir", "--db-file", "--backend", "--check_file_uptodate", "-k",
                  "--seek-file", "-n", "--process", "-P", "--parallel-type", "-r", "--reporter", "-o", "--output-file"}


def _is_build(argv: list[str]) -> bool:
    words, args = [], iter(argv[1:])
    for a in args:
        if a in _VALUE_OPTIONS:
            next(args, None)  # the option's value is not a command
        elif not a.startswith("-") and "=" not in a:
            words.append(a)
    return not words or words[0] not in _READ_ONLY


def hold_build_dir(layout: Layout) -> None:
    """One build at a time per build dir: a second one waits, saying for whom."""
    layout.root.mkdir(parents=True, exist_ok=True)
    f = open(layout.build_lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        print(f"qwenbuild: {layout.root} is being built by {holder}; waiting for it to finish "
              "(Ctrl-C to stop waiting)", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _held.append(f)
    # a build killed while writing qwen.lock or its stat cache leaves a temporary that no later write may sweep
    sweep_stale(layout.lock)


def dodo_namespace(manifest_path: str, build_dir: str | None = None, argv: list[str] | None = None) -> dict:
    """DOIT_CONFIG and task creators for the manifest; a bad manifest exits 2 with every error listed."""
    from qwenbuild.manifest import load_manifest
    from qwenbuild.tasks import doit_tasks

    argv = sys.argv if argv is None else argv
    try:
        manifest = load_manifest(Path(manifest_path))
        if build_dir:  # `doit build_dir=...`: the same inputs built elsewhere (qwenbuild verify)
            manifest.data["build"]["dir"] = str(Path(build_dir).resolve())
    except UserError as exc:
        print(f"qwenbuild: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
    layout = Layout(manifest.build_dir)
    if _is_build(argv):
        hold_build_dir(layout)
    else:
        layout.root.mkdir(parents=True, exist_ok=True)
    namespace = doit_tasks(manifest)
    namespace["DOIT_CONFIG"] = {"dep_file": str(layout.doit_db), "backend": "sqlite3", "verbosity": 2,
                                "default_tasks": ["finetune"]}
    return namespace
