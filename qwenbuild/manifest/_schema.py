"""JSON Schema validation of a manifest, each error turned into file:line, key path, what was found, what is allowed."""

from __future__ import annotations

import copy
import difflib
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "qwen.schema.json"


@lru_cache(maxsize=1)
def schema() -> dict:
    path = SCHEMA_PATH
    if not path.exists():  # installed as a wheel: the schema travels inside the package
        path = Path(__file__).resolve().parents[1] / "resources" / "qwen.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


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


def _allowed(s: dict) -> str:
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
    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
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
                               "minLength", "format"):
            out.append((_path(where), f"found {_show(err.instance)}, allowed: {_allowed(err.schema)}"))
        elif err.validator == "minItems":
            out.append((_path(where), f"found {len(err.instance)} entries, allowed: at least {err.validator_value}"))
        else:
            out.append((_path(where), err.message))
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
    """Schema node of a dotted key path (array items included)."""
    node = schema()
    for part in key_path.split("."):
        node = node.get("properties", {}).get(part) or {}
        if node.get("type") == "array":
            node = node.get("items", {})
    return node
