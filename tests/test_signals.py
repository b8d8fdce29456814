"""SIGINT and SIGTERM on real processes: `qwenbuild preprocess` with its pool of workers, and `doit finetune` with
msrun and its training workers. Whether the signal reaches the command alone (`kill`) or its whole process group
(a terminal's Ctrl-C), the command stops its whole tree, prints one `interrupted` line and no traceback, exits with
128 + the signal number, and keeps nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import reduced_manifest
from qwenbuild.data.alpaca import convert_alpaca
from qwenbuild.data.instructions import write_instruction_dataset
from qwenbuild.processes import descendants

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{8}")
SENTINEL = b"the user's earlier output\n"
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """80,000 conversations: seconds of work for two tokenizing workers."""
    d = tmp_path_factory.mktemp("signals-data")
    train, _ = write_instruction_dataset(d, seed=3, num_train=80000, num_heldout=10)
    convert_alpaca(train, d / "chatml.jsonl")
    return d / "chatml.jsonl"


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    # a session of its own: the process group holds the command and its children, as a terminal's job does
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {START_TIMEOUT_S} s")
        time.sleep(0.1)


def interrupt(proc: subprocess.Popen, sig: int, whole_group: bool) -> tuple[list[int], str, str]:
    """Send the signal; the processes below the command just before it, and the command's stdout and stderr."""
    below = descendants(proc.pid)
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return below, out, err


def running(pids: list[int]) -> list[str]:
    """Those of `pids` still running, with their command lines (a zombie has ended: only its status is left)."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(f"{pid} {cmdline}")
    return found


def survivors(below: list[int], pgid: int, grace_s: float = 5.0) -> list[str]:
    """Processes of the command's tree or group still running `grace_s` after it exited (msrun's workers run in
    sessions of their own, so the group alone would miss them)."""
    deadline = time.monotonic() + grace_s
    while True:
        group = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        left = running(sorted(set(below) | {int(p) for p in group}))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def assert_stopped_cleanly(proc: subprocess.Popen, sig: int, err: str, out: str, line: str) -> None:
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert [x for x in err.splitlines() if "interrupted" in x] == [line], err
    for text in (err, out):
        assert "Traceback" not in text and "Fatal Python error" not in text, text


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if TEMPORARY.match(p.name)]


def staged_bytes(directory: Path) -> int:
    """Bytes written so far into the temporaries of `directory`: rows arrive while the workers encode."""
    try:
        return sum(f.stat().st_size for t in temporaries(directory) for f in t.rglob("*") if f.is_file())
    except OSError:  # a file went away meanwhile
        return 0


PREPROCESS_CASES = [  # signal, to the whole group, an earlier output to keep
    (signal.SIGINT, False, False),
    (signal.SIGTERM, False, True),
    (signal.SIGINT, True, True),
    (signal.SIGTERM, True, False),
]


@pytest.mark.parametrize("sig,whole_group,existing", PREPROCESS_CASES,
                         ids=["sigint", "sigterm-earlier-output", "ctrl-c-group-earlier-output", "sigterm-group"])
def test_preprocess_stops_its_workers_and_keeps_nothing_half_written(chatml, qwen_dir, tmp_path, sig, whole_group,
                                                                     existing):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "rows.mindrecord"
    if existing:
        for path in (output, output.with_name(output.name + ".db")):
            path.write_bytes(SENTINEL)
    proc = start([str(Path(sys.executable).parent / "qwenbuild"), "preprocess", "--input_glob", str(chatml),
                  "--vocab_file", str(qwen_dir / "vocab.json"), "--merges_file", str(qwen_dir / "merges.txt"),
                  "--seq_length", "64", "--output_file", str(output), "--workers", "2"], tmp_path)
    wait_until(proc, lambda: staged_bytes(out_dir) > 1 << 20, "rows written")
    below, out, err = interrupt(proc, sig, whole_group)

    assert_stopped_cleanly(proc, sig, err, out, "qwenbuild preprocess: interrupted; nothing half-written was kept")
    assert not survivors(below, proc.pid), survivors(below, proc.pid)
    if existing:
        assert sorted(p.name for p in out_dir.iterdir()) == ["rows.mindrecord", "rows.mindrecord.db"]
        assert output.read_bytes() == SENTINEL
    else:
        assert list(out_dir.iterdir()) == [], "half-written output or temporaries kept"


def _lock_tasks(build: Path) -> dict:
    return json.loads((build / "qwen.lock").read_text())["tasks"]


def _training_workers(pid: int) -> list[int]:
    # msrun starts each worker as `python -m qwenbuild.train.worker ...`
    return [p for p in descendants(pid) if b"\0qwenbuild.train.worker\0" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.parametrize("sig,whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-group", "sigterm"])
def test_doit_finetune_stops_msrun_and_its_workers(tmp_path, sig, whole_group):
    manifest = reduced_manifest(tmp_path)
    build = tmp_path / "build"
    ready = subprocess.run(DOIT + [f"manifest={manifest}", "mindrecord", "shard", "launch", "run_config"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    proc = start(DOIT + [f"manifest={manifest}", "finetune"], tmp_path)
    # two ranks and msrun's scheduler, each a qwenbuild.train.worker process
    wait_until(proc, lambda: len(_training_workers(proc.pid)) >= 3, "training workers")
    below, out, err = interrupt(proc, sig, whole_group)

    assert_stopped_cleanly(proc, sig, err, out, "qwenbuild finetune: interrupted; nothing half-written was kept")
    assert not survivors(below, proc.pid), survivors(below, proc.pid)
    assert "finetune" not in _lock_tasks(build)
    assert not (build / "output" / "checkpoint" / ".qwenbuild-seal.json").exists(), "an unfinished run looks done"
    assert not temporaries(build), temporaries(build)


@pytest.mark.parametrize("staging", ["atomic_directory", "mindrecord"])
def test_a_signal_handled_as_the_temporary_directory_is_made_leaves_nothing(tmp_path, monkeypatch, staging):
    """Python runs a signal's handler at the first bytecode after the mkdir system call returns: the directory
    exists then, and the exception must still remove it."""
    from qwenbuild.data import mindrecord
    from qwenbuild.processes import Interrupted
    from qwenbuild.store import atomic_path

    real_mkdir = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if TEMPORARY.match(self.name):
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        if staging == "atomic_directory":
            with atomic_path(out, directory=True) as tmp:
                (tmp / "f").write_bytes(b"x")
        else:
            with mindrecord._staging_dir(out):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_writer_are_swept_nested_ones_too(tmp_path):
    """A task writes into a temporary directory through a writer that promotes atomically itself: killed, it leaves
    `.out.tmp-P-x` and `..out.tmp-P-x.tmp-P-y`; the next write of `out` removes both, and nothing a live process
    or the user owns."""
    from qwenbuild.store import atomic_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = [f".out.tmp-{dead}-0123abcd", f"..out.tmp-{dead}-0123abcd.tmp-{dead}-4567ef01",
            f".out.old-{dead}-89abcdef"]
    kept = [f".out.tmp-{os.getpid()}-0123abcd", f"..out.tmp-{os.getpid()}-0123abcd.tmp-{os.getpid()}-4567ef01",
            ".out.notes", "..out.tmp-1-0123abcd", f".other.tmp-{dead}-0123abcd", "out.tmp-1-0123abcd"]
    for name in left + kept:
        (tmp_path / name).mkdir()
    with atomic_path(tmp_path / "out", directory=True) as tmp:
        (tmp / "f").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])


# the signal comes while the command's modules are still being imported, before its own handlers exist
SIGNAL_DURING_IMPORTS = """
import builtins, os, signal, sys
real_import = builtins.__import__
def importing(name, *args, **kwargs):
    if name == "qwenbuild.cli":  # imported right after the start-up handlers
        os.kill(os.getpid(), signal.{sig})
    return real_import(name, *args, **kwargs)
builtins.__import__ = importing
sys.argv = ["qwenbuild", "validate", "-c", "qwen.toml"]
from qwenbuild.__main__ import main
sys.exit(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_command_has_loaded_ends_it_as_interrupted(tmp_path, sig):
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_IMPORTS.format(sig=sig.name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + sig, proc.stderr
    assert proc.stderr == "qwenbuild: interrupted; nothing half-written was kept\n"
    assert list(tmp_path.iterdir()) == []
