"""Reading a JSON file the user gave us: every way it can be wrong becomes one UserError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from qwenbuild.errors import UserError


class BadJSON(ValueError):
    """Text that is not JSON qwenbuild can read; the message says where and why."""


def parse_json(text: str | bytes):
    """json.loads, with every way of failing (syntax, nesting too deep for the parser) one BadJSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BadJSON("nested too deeply (arrays or objects inside each other thousands of levels down)") from None


def read_json(path: str | Path, what: str, missing_hint: str | None = None, hint: str | None = None):
    """The parsed content of `path`; `what` names the file in messages ("vocab file", "rank table", ...).

    `missing_hint` says how to make the file when it does not exist, `hint` what a valid one holds.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist", hint=missing_hint or hint) from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a JSON file", hint=hint) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}", hint=hint) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: not UTF-8 text (byte {exc.start})", hint=hint) from None
    try:
        return parse_json(text)
    except BadJSON as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}", hint=hint) from None
