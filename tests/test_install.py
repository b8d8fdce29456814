"""qwenbuild as an installed tool: a wheel built from the project, installed apart from the source tree, used in a
directory of the user's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """PYTHONPATH of a wheel installed into its own directory (the environment keeps only the dependencies)."""
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    source = tmp_path_factory.mktemp("source") / "qwenbuild"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "output"))
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, cwd=wheels)
    [wheel] = wheels.glob("qwenbuild-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return wheel, target


def _run(args, cwd, target) -> subprocess.CompletedProcess:
    # the installed wheel first; what the test run had there after it (tests/slow_guard sees msrun and training)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_wheel_carries_every_file_read_at_run_time(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("qwenbuild/resources/qwen.schema.json", "qwenbuild/resources/qwen.tiktoken",
                   "qwenbuild/tasks/graph.py", "qwenbuild/tasks/run_doit.py", "qwenbuild/train/worker.py"):
        assert needed in names, needed


@pytest.mark.slow
def test_init_doit_list_and_the_data_chain_in_a_users_directory(installed, tmp_path):
    _, target = installed
    project = tmp_path / "my-project"
    project.mkdir()
    where = _run(["-c", "import qwenbuild; print(qwenbuild.__file__)"], project, target)
    assert where.stdout.strip() == str(target / "qwenbuild" / "__init__.py")
    assert _run(["-m", "qwenbuild", "init"], project, target).returncode == 0
    assert sorted(p.name for p in project.iterdir()) == ["dodo.py", "qwen.toml"]
    before = (project / "qwen.toml").read_text(encoding="utf-8")
    edited = _run(["-m", "qwenbuild", "set", "dataset.num_train=300", "dataset.num_heldout=10"], project, target)
    assert edited.returncode == 0, edited.stderr
    after = (project / "qwen.toml").read_text(encoding="utf-8")
    dataset = tomllib.loads(after)["dataset"]
    assert (dataset["num_train"], dataset["num_heldout"]) == (300, 10)
    # only those two lines changed: comments and every other value are kept
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines())
    assert [b for _, b in changed] == ["num_train = 300", "num_heldout = 10"], changed
    valid = _run(["-m", "qwenbuild", "validate"], project, target)
    assert valid.returncode == 0 and valid.stdout.startswith(f"{project / 'qwen.toml'}: valid; "), valid.stderr
    listed = _run(["-m", "doit", "list"], project, target)
    assert listed.returncode == 0, listed.stderr
    assert {"finetune", "export", "mindrecord", "infer"} <= {line.split()[0] for line in listed.stdout.splitlines()}
    built = _run(["-m", "doit", "mindrecord"], project, target)
    assert built.returncode == 0, built.stderr[-3000:]
    assert [l[3:] for l in built.stdout.splitlines() if l.startswith(".  ")] == \
        ["dataset", "alpaca", "tokenizer", "mindrecord"]
    # nothing written refers to the source checkout
    for path in (project / "build").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".toml", ".sh", ".yaml", ".lock"):
            assert str(REPO) not in path.read_text(encoding="utf-8", errors="replace"), path
    assert str(REPO) not in (project / "build" / "qwen.lock").read_text()
