"""Shared fixtures: every test runs in its own temporary working directory (mindformers writes ./output/log)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the `slow` marker checked as tests run (tests/slow_guard)
from slow_guard.plugin import (pytest_configure, pytest_runtest_call, pytest_runtest_setup,  # noqa: F401
                               pytest_runtest_teardown, pytest_unconfigure)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """The real Qwen tokenizer files, built once per test session."""
    from qwenbuild.tokenizer import build_qwen_tokenizer

    path = tmp_path_factory.getbasetemp() / "qwen-tokenizer"
    if not path.exists():
        build_qwen_tokenizer(path)
    return path


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # msrun and doit subprocesses find this interpreter's tools first
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    yield
