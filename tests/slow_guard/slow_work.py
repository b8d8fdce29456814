"""What makes a test slow, seen from inside every process it starts: msrun, a training run (qwenbuild's loop or
MindFormers' entry) or a doit build (doit running one of qwenbuild's tasks).

conftest calls watch() in the test process and puts this folder on PYTHONPATH, so that sitecustomize.py beside it
calls watch() in every Python process the test starts (doit, qwenbuild, bash scripts' children, msrun and its
workers). Each such call appends one line to the file named by $QWENBUILD_TEST_SLOW_RECORD, naming the test
($QWENBUILD_TEST_NODEID) that was running when the process started; conftest fails a test without the `slow`
marker that has a line.
"""

import os
import sys

RECORD = "QWENBUILD_TEST_SLOW_RECORD"
NODEID = "QWENBUILD_TEST_NODEID"
DOIT_BUILD = "a doit build"
# module -> {function or Class.method: what calling it is}: msrun's entry, qwenbuild's training loop, MindFormers'
# run, and a task that doit runs (None: doit's own run, inside which a task call counts; a task's action called
# directly by a test is no build)
ENTRIES = {
    "mindspore.parallel.cluster.run": {"main": "msrun"},
    "qwenbuild.train.finetune": {"finetune": "the training loop"},
    "qwenbuild.train.mindformers_run": {"run": "MindFormers' Trainer"},
    "qwenbuild.tasks.doit_tasks": {"run_task": DOIT_BUILD},
    "doit.doit_cmd": {"DoitMain.run": None},
}
_in_doit = [0]


def record(what: str) -> None:
    path = os.environ.get(RECORD)
    if not path:
        return
    command = " ".join(getattr(sys, "orig_argv", sys.argv))[:300].replace("\n", " ")
    line = f"{os.environ.get(NODEID, '?')}\t{what}\t{os.getpid()}\t{command}\n"
    # one write of one short line to a file opened for appending: lines of concurrent processes do not interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _watched(original, what):
    # loaded when a watched module is, not at every interpreter's start (see watch)
    import functools

    @functools.wraps(original)
    def watched(*args, **kwargs):
        if what is None:
            _in_doit[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                _in_doit[0] -= 1
        if what != DOIT_BUILD or _in_doit[0]:
            record(what)
        return original(*args, **kwargs)

    watched.slow_work = what
    return watched


def _wrap(module) -> None:
    for name, what in ENTRIES[module.__name__].items():
        owner, _, attr = name.rpartition(".")
        holder = getattr(module, owner) if owner else module
        original = getattr(holder, attr, None)
        if original is not None and not hasattr(original, "slow_work"):
            setattr(holder, attr, _watched(original, what))


class _Loader:
    """The module's own loader, then the entries wrapped before anyone imports them by name."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _wrap(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    # the test process may load this module under two names (sitecustomize's and the plugin's): one finder is enough
    slow_work_finder = True

    def find_spec(self, name, path, target=None):
        if name not in ENTRIES:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "slow_work_finder", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def watch() -> None:
    """Record slow work in this process from now on (idempotent). Every Python process a test starts runs this
    first, so it imports nothing: a signal sent at a process's start must find it past its start-up as before."""
    if any(getattr(f, "slow_work_finder", False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for name in ENTRIES:
        if name in sys.modules:
            _wrap(sys.modules[name])
