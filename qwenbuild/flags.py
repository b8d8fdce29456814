"""Command-line value types shared by the `qwenbuild` subcommands and the run entries msrun starts."""

from __future__ import annotations

import argparse


def str2bool(text: str) -> bool:
    """True/False as the original scripts spell them (also 1/0, yes/no, on/off)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
