"""Shared fixtures: every test runs in its own temporary working directory (mindformers writes ./output/log)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


# the files that take minutes, longest first: with `-n 2 --dist loadfile` each file runs whole on one worker, so
# starting these first keeps one worker from running a long file alone at the end
LONGEST_FIRST = ["test_tensor_parallel.py", "test_faults.py", "test_deploy_parallel.py", "test_slurm.py",
                 "test_cluster.py", "test_mindformers_engine.py", "test_train_distributed.py", "test_seed_commands.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
