"""The `slow` marker is checked, not trusted: a test that starts msrun, a training run or a doit build without it
fails, naming what it started (tests/slow_guard). Proven on an inner pytest session whose tests do each, in the test
process, in a module fixture, in a child and in a grandchild process."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent

INNER = '''
import subprocess
import sys
from pathlib import Path

import pytest

MSRUN = Path(sys.executable).parent / "msrun"


def enter_the_training_loop():
    from qwenbuild.train.finetune import finetune

    with pytest.raises(AttributeError):
        finetune(None)  # entered, then stopped at once: there are no settings


def test_msrun_in_a_grandchild():
    subprocess.run(["bash", "-c", f"{MSRUN} --help"], check=True, capture_output=True)


def test_training_loop_in_the_test_process():
    enter_the_training_loop()


@pytest.fixture(scope="module")
def trained():
    enter_the_training_loop()


def test_training_loop_in_a_module_fixture(trained):
    pass


@pytest.mark.slow
def test_marked():
    enter_the_training_loop()


def test_doit_build_in_a_child(tmp_path):
    subprocess.run([sys.executable, "-m", "qwenbuild", "init"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "doit", "launch"], cwd=tmp_path, check=True, capture_output=True)


def test_neither(tmp_path):
    # a task's action called directly, and doit listing the tasks, build nothing
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.manifest import load_manifest
    from qwenbuild.tasks import task_specs
    from qwenbuild.tasks.context import Context, DeclaredManifest

    subprocess.run([sys.executable, "-m", "qwenbuild", "init"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "doit", "list"], cwd=tmp_path, check=True, capture_output=True)
    m = load_manifest(tmp_path / "qwen.toml")
    [spec] = [s for s in task_specs(m) if s.name == "launch"]
    spec.action(Context(spec.name, DeclaredManifest(m, spec.name, spec.keys), BuildDir(m.build_dir)))
'''


def test_a_test_that_starts_msrun_training_or_a_doit_build_without_the_marker_fails(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "slow_guard.plugin", "-p", "no:cacheprovider",
                           "-o", "markers=slow: x", "-o", "addopts=", "--rootdir", str(tmp_path),
                           "--junitxml", str(tmp_path / "report.xml"), "test_inner.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(tmp_path / "report.xml").iter("testcase"):
        found = [(child.tag, child.get("message", "")) for child in case if child.tag in ("failure", "error")]
        outcomes[case.get("name")] = found[0] if found else ("passed", "")
    loop = "starts the training loop ("
    assert outcomes["test_msrun_in_a_grandchild"][0] == "failure"
    assert "test_inner.py::test_msrun_in_a_grandchild starts msrun (" in outcomes["test_msrun_in_a_grandchild"][1]
    assert "msrun --help" in outcomes["test_msrun_in_a_grandchild"][1]
    assert outcomes["test_training_loop_in_the_test_process"][0] == "failure"
    assert loop in outcomes["test_training_loop_in_the_test_process"][1]
    # the fixture runs in the setup of the first test that asks for it: that test errors
    assert outcomes["test_training_loop_in_a_module_fixture"][0] == "error"
    assert loop in outcomes["test_training_loop_in_a_module_fixture"][1]
    assert outcomes["test_doit_build_in_a_child"][0] == "failure"
    assert "starts a doit build (" in outcomes["test_doit_build_in_a_child"][1]
    assert outcomes["test_marked"] == ("passed", "") and outcomes["test_neither"] == ("passed", ""), outcomes
