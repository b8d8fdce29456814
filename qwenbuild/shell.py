"""Values written into generated shell scripts: the one quoting rule.

Every value a script holds goes through `word` (quoted as one shell word, comments included) and is refused when it
holds a control character, since a line break ends a comment and starts a command. Only shell code qwenbuild
itself wrote (`Code`, such as "$node") is written as it is.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from qwenbuild import schema
from qwenbuild.errors import UserError


class Code(str):
    """Shell text written by qwenbuild itself (a variable expansion), not a value: `word` leaves it as it is."""


def word(value) -> str:
    """One shell word holding `value` exactly."""
    if isinstance(value, Code):
        return str(value)
    text = str(value)
    problem = schema.control_problem(text)
    if problem:
        raise UserError(f"{text!r} cannot be written into a generated script: {problem.replace('found a', 'a', 1)}")
    return shlex.quote(text)


def words(argv) -> str:
    return " ".join(word(a) for a in argv)


def comment(text: str) -> str:
    """A comment line; the values in `text` must already have gone through `word`."""
    if schema.control_problem(text):
        raise UserError(f"a generated script's comment would span lines: {text!r}")
    return f"# {text}"


def host_name(value: str) -> str:
    """A host name as qwen.toml allows it (RFC 1123), else a UserError."""
    if not isinstance(value, str) or not re.fullmatch(schema.describe("hardware.nodes.host")["pattern"], value):
        raise UserError(f"host {value!r} is not a host name (RFC 1123: letters, digits, inner hyphens and dots)")
    return value


def ipv4(value: str) -> str:
    """An IPv4 address as qwen.toml allows it, else a UserError."""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise UserError(f"{value!r} is not an IPv4 address") from None
