"""schemas/qwen.schema.json: the keys of qwen.toml, their defaults and bounds; each violation in words (key path,
what was found, what is allowed)."""

from __future__ import annotations

import copy
import difflib
import json
import math
import unicodedata
from functools import lru_cache
from pathlib import Path

import jsonschema

# inside the package, so an installed qwenbuild has it; the repository's schemas/qwen.schema.json links here
SCHEMA_PATH = Path(__file__).resolve().parent / "resources" / "qwen.schema.json"


def _is_integer(_checker, value) -> bool:
    # JSON Schema counts 2.0 as an integer; a count or a seed written as a float is a mistake in qwen.toml
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker, value) -> bool:
    # nan and inf compare false with every bound: refuse them here, once
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer,
                                                                             "number": _is_number}))


def _validator(node: dict):
    return _Validator(node, format_checker=jsonschema.FormatChecker())


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def allowed(s: dict) -> str:
    if "x-allowed" in s:  # a pattern in words
        return s["x-allowed"]
    if "enum" in s:
        return "one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in s["enum"])
    kind = s.get("type", "value")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    bounds = []
    if "minimum" in s:
        bounds.append(f">= {s['minimum']}")
    if "exclusiveMinimum" in s:
        bounds.append(f"> {s['exclusiveMinimum']}")
    if "maximum" in s:
        bounds.append(f"<= {s['maximum']}")
    if "exclusiveMaximum" in s:
        bounds.append(f"< {s['exclusiveMaximum']}")
    if "minLength" in s and kind == "string":
        bounds.append("not empty")
    if s.get("format") == "ipv4":
        bounds.append("an IPv4 address")
    return " ".join([kind] + bounds)


def problems(data: dict) -> list[tuple[str, str]]:
    """Every schema violation as (key path, message), in document order of the schema."""
    validator = _validator(schema())
    out = []
    for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties":
            known = list(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                out.append((_path(where + [key]), f"unknown key{hint} allowed: {', '.join(known)}"))
        elif err.validator == "required":
            key = err.message.split("'")[1]
            out.append((_path(where + [key]), "missing; this key is required"))
        elif err.validator in ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                               "minLength", "maxLength", "format", "pattern"):
            out.append((_path(where), f"found {_show(err.instance)}, allowed: {allowed(err.schema)}"))
        elif err.validator == "minItems":
            out.append((_path(where), f"found {len(err.instance)} entries, allowed: at least {err.validator_value}"))
        else:
            out.append((_path(where), err.message))
    named = {where for where, _ in out}
    return out + [(where, message) for where, message in control_characters(data) if where not in named]


# names of the control characters people type by accident; the rest are shown by code point
_CONTROL_NAMES = {"\n": "a line feed", "\r": "a carriage return", "\t": "a tab", "\x1b": "an escape",
                  "\x00": "a NUL"}


def control_problem(text: str) -> str | None:
    """Why a manifest string cannot be taken (it holds a control character or a line separator), or None.

    Every string of qwen.toml is one line of text: any of them may end up in a generated script, where a line
    break would start a command (in a comment too)."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            name = _CONTROL_NAMES.get(ch, f"U+{ord(ch):04X}")
            return (f"found a string holding {name} (U+{ord(ch):04X}) at character {i + 1}; qwen.toml strings are "
                    "one line of text without control characters")
    return None


def control_characters(data, where: tuple = ()) -> list[tuple[str, str]]:
    """(key path, message) for every string, or table key, of the manifest that holds a control character."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            problem = control_problem(str(key))
            if problem:
                out.append((_path(where + (key,)), problem.replace("a string", "a key name", 1)))
            out += control_characters(value, where + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += control_characters(value, where + (i,))
    elif isinstance(data, str):
        problem = control_problem(data)
        if problem:
            out.append((_path(where), problem))
    return out


def with_defaults(data: dict) -> dict:
    """A copy of `data` with every schema default filled in (sections included)."""
    def fill(node: dict, s: dict) -> None:
        for key, sub in s.get("properties", {}).items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if isinstance(node.get(key), dict) and sub.get("type") == "object":
                fill(node[key], sub)
            if isinstance(node.get(key), list) and isinstance(sub.get("items"), dict):
                for item in node[key]:
                    if isinstance(item, dict):
                        fill(item, sub["items"])

    out = copy.deepcopy(data)
    fill(out, schema())
    return out


def describe(key_path: str) -> dict:
    """Schema node of a dotted key path (a key inside the tables of an array: the items' key)."""
    node = schema()
    for part in key_path.split("."):
        if node.get("type") == "array":
            node = node.get("items", {})
        node = node.get("properties", {}).get(part) or {}
    return node


def is_key(key_path: str) -> bool:
    """True for a section (`lite`), a section's key (`train.learning_rate`) or a key of a table inside a section
    (`train.lora.rank`) that the schema defines."""
    node = schema()
    for part in key_path.split("."):
        node = node.get("properties", {}).get(part) if node.get("type", "object") == "object" else None
        if node is None:
            return False
    return True


def value_problem(key_path: str, value) -> str | None:
    """Why `value` is not allowed for a qwen.toml key (`found ..., allowed: ...`), or None when it is."""
    node = describe(key_path)
    validator = _validator(node)
    if next(validator.iter_errors(value), None) is None:
        found = control_characters(value)
        return found[0][1] if found else None
    return f"found {_show(value)}, allowed: {allowed(node)}"
