"""In-place edits of qwen.toml with tomlkit (comments and formatting kept), validated before the file is replaced."""

from __future__ import annotations

import json
from pathlib import Path

import tomlkit
from tomlkit.exceptions import ParseError

from qwenbuild.errors import UserError
from qwenbuild.manifest._load import ManifestError, load_manifest, read_toml
from qwenbuild.manifest._presets import DIMENSION_KEYS
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import atomic_path


def parse_value(text: str):
    try:
        return tomlkit.parse(f"v = {text}")["v"]
    except ParseError:
        return text  # a bare word: a string


def _table(doc, parts: list[str], key: str):
    node = doc
    for part in parts:
        if part not in node:
            node[part] = tomlkit.table()
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"{key}: {part} is not a table")
    return node


def _switch_to_checkpoint(doc, manifest_dir: Path, hf_dir: str) -> list[str]:
    """Drop the preset and any dimension the checkpoint's config.json contradicts."""
    model = doc["model"]
    notes = []
    if "preset" in model:
        notes.append(f"removed model.preset = {model['preset']!r}: dimensions now come from {hf_dir}/config.json")
        del model["preset"]
    try:
        dims = QwenConfig.from_hf_dir(manifest_dir / hf_dir).__dict__
    except UserError:
        return notes
    for key in DIMENSION_KEYS:
        if key in model and model[key] != dims[key]:
            notes.append(f"removed model.{key} = {model[key]!r}: the checkpoint has {dims[key]!r}")
            del model[key]
    return notes


def set_keys(path: Path, changes: list[tuple[str, str]]) -> list[str]:
    read_toml(path)  # clear errors for a missing or broken file
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    report = []
    for key, text in changes:
        parts = key.split(".")
        value = parse_value(text)
        table = _table(doc, parts[:-1], key)
        old = table.get(parts[-1])
        table[parts[-1]] = value
        shown = json.dumps(value.unwrap() if hasattr(value, "unwrap") else value, ensure_ascii=False)
        report.append(f"{key} = {shown}" + ("" if old is None else f" (was {json.dumps(old.unwrap() if hasattr(old, 'unwrap') else old, ensure_ascii=False)})"))
        if key == "model.hf_dir":
            report += _switch_to_checkpoint(doc, path.parent, str(value))
    with atomic_path(path) as tmp:
        tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
        # validate the edited text in place of the original; a failure leaves the original untouched
        try:
            load_manifest(path.parent / tmp.name)
        except ManifestError as exc:
            for p in exc.problems:
                p.file = str(path)
            raise ManifestError(exc.problems) from None
    return report + [f"updated {path}"]
