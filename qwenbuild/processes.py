"""The processes qwenbuild starts, and what a signal does to them: one policy for all.

Children (pool workers, msrun and its workers, export and rebuild subprocesses) ignore SIGINT and SIGTERM from
birth and die with their parent: the parent decides. The parent turns SIGINT and SIGTERM into `Interrupted`, which
unwinds like Ctrl-C: every `finally` removes its temporaries and kills its whole tree of children, and the command
ends with one line and exit code 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.pool
import os
import signal
import subprocess
import sys
import threading
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:
    # loaded now: a child between fork and exec must not load libraries
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signal that started the stop, once one came
_asked_again: list[int] = []  # a signal that came during an import, to be sent again
# imports already under way when the handlers were installed (doit loading dodo.py): those may be interrupted
_imports_at_start: list = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached this process; a KeyboardInterrupt, so code that handles Ctrl-C handles both."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_line(what: str) -> str:
    return f"{what}: interrupted; nothing half-written was kept"


def stop_on_signals(what: str) -> None:
    """Make SIGINT and SIGTERM raise Interrupted in this process; one that escapes every handler still ends as the
    one `interrupted` line and exit code 128 + signal, never a traceback. A signal ignored from the start stays
    ignored (Python's own rule for SIGINT): this process is a child whose parent decides, or a background job."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the process's entry point did
    _received.clear()
    _imports_at_start[:] = _imports(sys._getframe())
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_stop_signal)
    hook = sys.excepthook
    sys.excepthook = _ExceptHook(what, hook.fallback if isinstance(hook, _ExceptHook) else hook)


def _on_stop_signal(signum: int, frame) -> None:
    if _received:
        return  # the stop is under way: a second signal would only cut its cleanup short
    if any(f not in _imports_at_start for f in _imports(frame)):
        # a native extension (MindSpore) imported halfway cannot be imported again and crashes the exit
        _ask_again_soon(signum)
        return
    _received.append(signum)
    raise Interrupted(signum)


def _imports(frame) -> list:
    """The frames of the imports under way in `frame`'s stack."""
    found = []
    while frame is not None:
        if frame.f_code.co_name == "_find_and_load" and frame.f_code.co_filename.startswith("<frozen importlib"):
            found.append(frame)
        frame = frame.f_back
    return found


def _ask_again_soon(signum: int) -> None:
    """Send `signum` to this process again in 50 ms, until it lands outside an import."""
    if _asked_again:
        return
    _asked_again.append(signum)
    timer = threading.Timer(0.05, _send_again, (signum,))
    timer.daemon = True
    timer.start()


def _send_again(signum: int) -> None:
    _asked_again.clear()
    os.kill(os.getpid(), signum)


def interruption(exc: BaseException) -> Interrupted | None:
    """The interruption behind `exc`: Ctrl-C, a stop signal, or any error raised while unwinding from one."""
    if isinstance(exc, Interrupted):
        return exc
    if _received:
        return Interrupted(_received[0])
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return None


class _ExceptHook:
    """For code qwenbuild does not run itself (doit between tasks): an interruption that reaches the top."""

    def __init__(self, what: str, fallback: Callable):
        self.what, self.fallback = what, fallback

    def __call__(self, kind, exc, tb) -> None:
        stop = interruption(exc)
        if stop is None:
            return self.fallback(kind, exc, tb)
        logger.warning(interrupted_line(self.what))
        sys.stdout.flush()
        sys.stderr.flush()
        # every `finally` has run; an unhandled exception would otherwise end with exit code 1
        os._exit(stop.exit_code)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed build leaves nothing running."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def follow_parent() -> None:
    """What every child does first: ignore SIGINT and SIGTERM and die with the parent. A terminal's Ctrl-C or a
    stop of the whole group reaches every process, but only the parent knows what to clean up; it kills its tree.
    Ignoring survives exec, so a child's own children ignore them too."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pool worker is born with them blocked
    die_with_parent()


def start_child(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen of a child that follows the parent; stop it with `stop_child`."""
    return subprocess.Popen(argv, preexec_fn=follow_parent, **popen_kwargs)


def stop_child(proc: subprocess.Popen) -> None:
    kill_tree(proc.pid)
    proc.wait()


def run_child(argv: list[str], *, timeout: float | None = None, capture_output: bool = False,
              **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of a child that follows the parent: an interruption or timeout stops its whole tree."""
    if capture_output:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with start_child(argv, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            stop_child(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _PoolWorker(multiprocessing.context.SpawnProcess):
    def terminate(self) -> None:
        self.kill()  # it ignores SIGTERM


class _Pool(multiprocessing.pool.Pool):
    """A pool whose workers are never killed by a signal meant for the parent: one killed while it holds the pool's
    queue lock would hang the pool's own shutdown."""

    @staticmethod
    def Process(ctx, *args, **kwargs):
        return _PoolWorker(*args, **kwargs)


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Callable, initargs: tuple = ()) -> Iterator[multiprocessing.pool.Pool]:
    """A spawned multiprocessing pool whose workers follow the parent; leaving the block kills them."""
    # workers inherit the blocked mask, so none is stopped while its interpreter starts; the resource tracker is
    # started first, as starting it unblocks both signals
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        spawn = multiprocessing.get_context("spawn")
        with _Pool(workers, _start_worker, (initializer, initargs), context=spawn) as pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal meanwhile lands here, inside the pool's block
            yield pool
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _start_worker(initializer: Callable, initargs: tuple) -> None:
    follow_parent()
    initializer(*initargs)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (msrun's workers run in their own process groups)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. The tree is frozen first, so none starts a child that a kill of
    its parent would miss (msrun starting workers)."""
    frozen: list[int] = []
    while new := [p for p in [pid, *descendants(pid)] if p not in frozen]:
        for p in new:
            _signal(p, signal.SIGSTOP)
        frozen += new
    for p in frozen:
        _signal(p, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
