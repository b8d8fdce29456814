"""Reading a JSON file the user gave us: every way it can be wrong becomes one UserError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from qwenbuild.errors import UserError


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
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}",
                        hint=hint) from None
