"""The `slow` marker, checked while tests run: a test that starts msrun, a training run or a doit build without the
marker fails, naming what it started. conftest loads this plugin; `pytest -p slow_guard.plugin` loads it elsewhere."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from slow_guard import slow_work

GUARD_DIR = Path(__file__).resolve().parent
_state: dict = {}


def pytest_configure(config) -> None:
    # one record per pytest process (each xdist worker has its own), read from where the last phase stopped
    directory = Path(tempfile.mkdtemp(prefix="qwenbuild-slow-work-"))
    _state.update(directory=directory, record=directory / "record.tsv", offset=0)
    os.environ[slow_work.RECORD] = str(_state["record"])
    # every Python process started from here on loads sitecustomize.py from this folder
    os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    slow_work.watch()


def pytest_unconfigure(config) -> None:
    if "directory" in _state:
        shutil.rmtree(_state["directory"], ignore_errors=True)


def _new_lines() -> list[list[str]]:
    try:
        with open(_state["record"], "rb") as f:
            f.seek(_state["offset"])
            data = f.read()
    except FileNotFoundError:
        return []
    # a line still being written stays for the next read
    complete = data[:data.rfind(b"\n") + 1]
    _state["offset"] += len(complete)
    return [line.split("\t", 3) for line in complete.decode("utf-8", "replace").splitlines()]


def _is_slow(nodeid: str, item) -> bool:
    named = item if nodeid == item.nodeid else next((i for i in item.session.items if i.nodeid == nodeid), None)
    # work started outside any test (collection, a plugin) is no test's
    return named is None or named.get_closest_marker("slow") is not None


def _guarded(item):
    os.environ[slow_work.NODEID] = item.nodeid
    _new_lines()  # anything before this phase is not its own
    try:
        return (yield)
    finally:
        unmarked = [(nodeid, what, command) for nodeid, what, _, command in _new_lines()
                    if not _is_slow(nodeid, item)]
        if unmarked:
            nodeid, what, command = unmarked[0]
            pytest.fail(f"{nodeid} starts {what} ({command}) without @pytest.mark.slow: `-m \"not slow\"` must "
                        "leave out every test that trains, launches msrun or builds through doit", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded(item))
