"""The scratch directory of one benchmark run: removed when the run ends, however it ends, unless kept."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def scratch_directory(prefix: str, keep: Path | str | None = None) -> Iterator[Path]:
    """`keep` if given (created, left in place), else a new temporary directory deleted on exit.

    A benchmark's files run to gigabytes (a 0.5B model's weights, checkpoints and data): left behind by an error, a
    Ctrl-C or a `kill`, a few runs fill the disk.
    """
    if keep is not None:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # SIGTERM ends the run through the `finally` below, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield path
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(path, ignore_errors=True)
