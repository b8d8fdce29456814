"""Reading a JSON file the user gave us: every way it can be wrong becomes one UserError naming the file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qwenbuild.errors import UserError

# a JSON file qwenbuild reads whole (alpaca data, rank tables, configs) is far below this; a device or a pipe that
# never ends is stopped here instead of filling memory
MAX_READ_BYTES = 4 << 30


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
    except ValueError as exc:  # Python's limit on converting long digit strings
        raise BadJSON(f"a number too long to read: {exc}") from None


def refuse_device(f, path, what: str) -> None:
    """A user file read line by line or whole must not be a device: /dev/zero is one endless line."""
    mode = os.fstat(f.fileno()).st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise UserError(f"{what} {path} is a device, not a file", hint="pass a regular file")


def read_bytes(path: str | Path, what: str, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of a file read whole, refusing a device (/dev/zero never ends) and anything over `limit` bytes;
    OSErrors propagate for the caller to word."""
    path = Path(path)
    with open(path, "rb") as f:
        refuse_device(f, path, what)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} {path} holds more than {limit / 2**20:,.0f} MiB, more than qwenbuild reads whole",
                        hint="split it into smaller files")
    return data


def read_json(path: str | Path, what: str, missing_hint: str | None = None, hint: str | None = None):
    """The parsed content of `path`; `what` names the file in messages ("vocab file", "rank table", ...).

    `missing_hint` says how to make the file when it does not exist, `hint` what a valid one holds.
    """
    path = Path(path)
    try:
        data = read_bytes(path, what)
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
