"""Run this machine's training workers under msrun (a node's launch script, or msrun itself), echo rank 0's
progress, and report the log of a rank that failed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.logs import shows
from qwenbuild.parallel.launch_scripts import PORT_VARIABLE, free_port, local_msrun
from qwenbuild.processes import start_child, stop_child
from qwenbuild.store import output_path, refuse_not_a_directory
from qwenbuild.train import worker
from qwenbuild.train.progress import STEP_LINE, bar

logger = logging.getLogger(__name__)

TAIL_LINES = 25
# lines of a worker log worth echoing: our own progress and summaries, never MindSpore's log chatter
_ECHO_PREFIXES = ("step ", "resuming ", "trained ", worker.ERROR_MARK, "mindformers_run:")
# MindFormers' loss monitor, one line per step
_MINDFORMERS_STEP = " - INFO - { Epoch:"


def worker_env(python_bin_dir: str | Path | None) -> dict:
    env = dict(os.environ)
    bin_dir = str(python_bin_dir or Path(sys.executable).parent)
    # msrun starts `python` from PATH: the environment with mindspore must come first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return f"({path} was not written)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    useful = [line for line in text if not line.startswith(("[WARNING]", "[INFO]", "[DEBUG]"))]
    return "\n".join(useful[-lines:])


def failed_rank_log(log_dir: Path, worker_count: int) -> tuple[int, Path]:
    """The rank whose log shows the failure (our error mark or a traceback), else rank 0."""
    logs = [log_dir / f"worker_{rank}.log" for rank in range(worker_count)]
    for marker in (worker.ERROR_MARK, "Traceback (most recent call last)", "Error"):
        for rank, path in enumerate(logs):
            if path.is_file() and marker in path.read_text(encoding="utf-8", errors="replace"):
                return rank, path
    return 0, logs[0]


class _Echo:
    """Follows rank 0's log and repeats its progress lines on stderr, with a bar on a terminal."""

    def __init__(self, path: Path, show_bar: bool):
        self.path, self.offset, self.pending, self.show_bar = path, 0, "", show_bar

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "r", encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.pending += chunk
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(_ECHO_PREFIXES):
                self._show(line)
            elif _MINDFORMERS_STEP in line:
                self._show(line[line.index("{ Epoch:"):])

    def _show(self, line: str) -> None:
        if self.show_bar:
            sys.stderr.write("\r\033[K")
        # a worker's error stays an error here, shown also when progress is not
        logger.log(logging.ERROR if line.startswith(worker.ERROR_MARK) else logging.INFO, line)
        m = STEP_LINE.match(line)
        if self.show_bar and m:
            sys.stderr.write(bar(int(m.group(1)), int(m.group(2))))
            sys.stderr.flush()

    def close(self) -> None:
        self.poll()
        if self.show_bar:
            sys.stderr.write("\r\033[K")


def no_tail(worker_count: int) -> int:
    """msrun's --tail_worker_log value that tails no log: its `tail -f` would outlive a killed build, and rank 0's
    log is echoed here instead."""
    return worker_count + 1


def run_workers(argv: list[str], log_dir: str | Path, worker_count: int, env: dict, poll_s: float = 0.5) -> None:
    """Run msrun, or a launch script that execs it, for `worker_count` workers on this machine; raises UserError
    with the failed rank's log. Logs land in log_dir (scheduler.log, worker_N.log, msrun.log), replacing old ones."""
    log_dir = Path(log_dir)
    refuse_not_a_directory(log_dir, "--log_dir")
    log_dir.mkdir(parents=True, exist_ok=True)
    output_path(log_dir / "msrun.log")  # written in place below: never a link or a device
    for old in [*log_dir.glob("worker_*.log"), log_dir / "scheduler.log", log_dir / "msrun.log"]:
        old.unlink(missing_ok=True)
    echo = _Echo(log_dir / "worker_0.log", sys.stderr.isatty() and shows())
    with open(log_dir / "msrun.log", "w", encoding="utf-8") as out:
        # msrun in a session of its own: a terminal's Ctrl-C reaches only qwenbuild, which stops the whole tree
        proc = start_child(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                echo.poll()
                time.sleep(poll_s)
        except BaseException:
            stop_child(proc)
            raise
        finally:
            echo.close()
    if proc.returncode != 0:
        if not any(log_dir.glob("worker_*.log")):
            # the node stopped before msrun started a worker (its check of the build dir, or msrun itself)
            raise UserError(f"the node's workers never started (exit code {proc.returncode}); last lines of "
                            f"{log_dir / 'msrun.log'}:\n{log_tail(log_dir / 'msrun.log')}")
        rank, path = failed_rank_log(log_dir, worker_count)
        raise UserError(f"training worker rank {rank} failed (msrun exit code {proc.returncode}); "
                        f"last lines of {path}:\n{log_tail(path)}",
                        hint=f"all logs are in {log_dir}; rerunning resumes from the last checkpoint")


def run_node_script(script: str | Path, log_dir: str | Path, worker_count: int,
                    python_bin_dir: str | Path | None = None, set_port: bool = True) -> None:
    """Run a generated node_K.sh; a one-node CPU script gets a free port, so builds side by side do not collide
    (the nodes of a cluster all use the manifest's master_port)."""
    env = worker_env(python_bin_dir)
    if set_port:
        env[PORT_VARIABLE] = str(free_port())
    run_workers(["bash", str(script)], log_dir, worker_count, env)


def run_msrun(worker_count: int, run_json: str | Path, log_dir: str | Path, master_port: int | None = None,
              python_bin_dir: str | Path | None = None) -> None:
    """Train with `worker_count` workers on this machine from a run.json (`qwenbuild finetune`)."""
    env = worker_env(python_bin_dir)
    argv = local_msrun(worker_count, log_dir, [worker.__file__, "--config", str(Path(run_json).resolve())],
                       python_bin_dir or Path(sys.executable).parent)
    if master_port:
        argv = [a if not a.startswith("--master_port=") else f"--master_port={master_port}" for a in argv]
    run_workers(argv, log_dir, worker_count, env)
