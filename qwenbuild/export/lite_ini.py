"""lite.ini: the MindSpore Lite configuration of the original Qwen1.5 deployment (GE provider on Ascend)."""

from __future__ import annotations

import os
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.store import atomic_path

# key order as in the original README, so the file diffs cleanly against it
BASE_SECTIONS: dict[str, dict[str, str]] = {
    "ascend_context": {"provider": "ge"},
    "ge_session_options": {
        "ge.externalWeight": "1",
        "ge.exec.atomicCleanPolicy": "1",
        "ge.event": "notify",
        "ge.exec.staticMemoryPolicy": "2",
        "ge.exec.formatMode": "1",
        "ge.exec.precision_mode": "must_keep_origin_dtype",
    },
}


def _value_text(section: str, key: str, value) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str, os.PathLike)):
        text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    else:
        raise UserError(f"lite.ini [{section}] {key}: value {value!r} is a {type(value).__name__}",
                        hint="use a string, a number or a boolean, or None to drop the key")
    if "\n" in text or "\r" in text:
        raise UserError(f"lite.ini [{section}] {key}: value {text!r} spans several lines", hint="use a one-line value")
    return text


def _check_name(what: str, name: str, where: str) -> None:
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "[]=\n\r#;") or name != name.strip():
        raise UserError(f"lite.ini {where}: {what} name {name!r} is not allowed",
                        hint="names are non-empty, without spaces at the ends and without [ ] = # ; or newlines")


def lite_ini_sections(rank_table_file=None, overrides: dict | None = None) -> dict[str, dict[str, str]]:
    """Sections and keys of lite.ini: the original's, then the rank table, then overrides (None drops a key)."""
    sections = {name: dict(keys) for name, keys in BASE_SECTIONS.items()}
    if rank_table_file is not None:
        sections["ascend_context"]["rank_table_file"] = _value_text("ascend_context", "rank_table_file",
                                                                    rank_table_file)
    for section in sorted(overrides or {}):
        _check_name("section", section, f"[{section}]")
        keys = overrides[section]
        if not isinstance(keys, dict):
            raise UserError(f"lite.ini [{section}]: overrides must be a table of key = value, not {keys!r}")
        target = sections.setdefault(section, {})
        for key in sorted(keys):
            _check_name("key", key, f"[{section}]")
            if keys[key] is None:
                target.pop(key, None)
            else:
                target[key] = _value_text(section, key, keys[key])
    return {name: keys for name, keys in sections.items() if keys}


def render_lite_ini(sections: dict[str, dict[str, str]]) -> bytes:
    blocks = ["\n".join([f"[{name}]"] + [f"{k}={v}" for k, v in keys.items()]) for name, keys in sections.items()]
    return ("\n\n".join(blocks) + "\n").encode("utf-8")


def write_lite_ini(path, rank_table_file=None, overrides: dict | None = None) -> Path:
    """Write lite.ini atomically; the same arguments always give the same bytes.

    rank_table_file: set it when the graphs run on several ranks (written as given, so pass the path the
    inference hosts will see). overrides: {section: {key: value}}; value None removes a key of the original.
    """
    path = Path(path)
    data = render_lite_ini(lite_ini_sections(rank_table_file, overrides))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
