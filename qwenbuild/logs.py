"""qwenbuild's messages: every module logs to its own logger under `qwenbuild`; the command line, the build and the
worker processes show them on stderr as bare lines, at the level -v / -q or QWENBUILD_LOG asks for."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qwenbuild.errors import UserError

ENV = "QWENBUILD_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_PACKAGE = "qwenbuild"


def entry_logger(file: str) -> logging.Logger:
    """The logger of a module that also runs as a program (`python -m` or by its path), named by where it lies in
    the package: as __main__ its lines would reach no qwenbuild handler."""
    parts = Path(file).resolve().with_suffix("").parts
    return logging.getLogger(".".join(parts[len(parts) - 1 - parts[::-1].index(_PACKAGE):]))


class _Stderr(logging.StreamHandler):
    """The message alone, on whatever sys.stderr is when it comes (tests and signal handlers swap it), flushed."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass  # always the current sys.stderr


def level_from(name: str | None) -> str:
    """A level name: `name`, else $QWENBUILD_LOG, else info."""
    chosen = (name or os.environ.get(ENV) or "info").strip().lower()
    if chosen not in LEVELS:
        raise UserError(f"{ENV}={chosen!r} is not a log level", hint=f"use one of {', '.join(LEVELS)}")
    return chosen


def configure(name: str | None = None) -> str:
    """Show qwenbuild's messages at level `name` (debug, info, warning; default $QWENBUILD_LOG, else info) and above
    on stderr, each once; returns the level's name."""
    chosen = level_from(name)
    logger = logging.getLogger(_PACKAGE)
    logger.setLevel(LEVELS[chosen])
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.propagate = False  # shown here; an application's root handler would print each line twice
    return chosen


def shows(level: int = logging.INFO) -> bool:
    """Whether messages of `level` reach the user (a progress bar is drawn only when its lines are)."""
    return logging.getLogger(_PACKAGE).isEnabledFor(level)
