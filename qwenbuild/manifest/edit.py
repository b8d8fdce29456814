"""In-place edits of qwen.toml with tomlkit (comments and formatting kept), validated before the file is replaced.

Key paths are dotted, with indexes into arrays of tables: `train.learning_rate`, `hardware.nodes[1].ip`;
`hardware.nodes[+].host` appends a node and `hardware.nodes[-1]` is the last one. The edit is written through to
the file the user has (the target of a link, every hard link, its mode, line endings and byte-order mark kept).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import tomlkit
from tomlkit.exceptions import ParseError
from tomlkit.items import Whitespace

from qwenbuild.errors import UserError
from qwenbuild.manifest._lines import key_lines, line_of
from qwenbuild.manifest._load import BOM, ManifestError, load_manifest, parse_toml, read_manifest_text
from qwenbuild.manifest._presets import DIMENSION_KEYS
from qwenbuild.model.config import QwenConfig
from qwenbuild.store import real_file, remove, tmp_sibling, write_through

_PART = re.compile(r"^([A-Za-z0-9_-]+)(?:\[(\+|-?\d+)\])?$")


def parse_value(text: str):
    try:
        # ended by a newline as a key's line is: otherwise, added last in a table, it takes the blank line after it
        return tomlkit.parse(f"v = {text}\n")["v"]
    except ParseError:
        return text  # a bare word: a string


def _parts(key: str) -> list[tuple[str, str | None]]:
    parts = []
    for part in key.split("."):
        m = _PART.match(part)
        if not m:
            raise UserError(f"{key!r} is not a key path", hint="write it like train.seed or hardware.nodes[1].ip")
        parts.append((m.group(1), m.group(2)))
    return parts


def _plain(value):
    return value.unwrap() if hasattr(value, "unwrap") else value


def _step(node, name: str, index: str | None, key: str, create: bool, created: list | None = None):
    """The table (or array element) `name[index]` below `node`; `+` appends a table to an array of tables; a table
    made here goes into `created`."""
    if not isinstance(node, dict):
        raise UserError(f"{key}: the part before {name!r} is not a table")
    if name not in node:
        if not create or (index is not None and index != "+"):
            raise UserError(f"{key}: {name} is not in the manifest")
        node[name] = tomlkit.aot() if index == "+" else tomlkit.table()
        if index is None and created is not None:
            created.append(node[name])
    child = node[name]
    if index is None:
        return child
    if not isinstance(child, list):
        raise UserError(f"{key}: {name} is not an array of tables")
    if index == "+":
        child.append(tomlkit.table())
        return child[-1]
    try:
        return child[int(index)]
    except IndexError:
        raise UserError(f"{key}: {name} has {len(child)} entries, so [{index}] does not exist",
                        hint=f"use [+] to append one, or an index in 0..{len(child) - 1}") from None


def _switch_to_checkpoint(doc, manifest_dir: Path, hf_dir: str) -> list[str]:
    """Drop a random start; once the checkpoint's config.json is there, drop the preset too and any dimension it
    contradicts (before, the preset's dimensions plan the cluster while the download runs)."""
    model = doc["model"]
    notes = []
    if model.get("init") == "random":
        notes.append(f"removed model.init = 'random': the starting weights now come from {hf_dir}")
        del model["init"]
    if not (manifest_dir / hf_dir / "config.json").is_file():
        return notes
    try:
        dims = QwenConfig.from_hf_dir(manifest_dir / hf_dir).__dict__
    except UserError:
        return notes  # validation names what is wrong with it
    if "preset" in model:
        notes.append(f"removed model.preset = {model['preset']!r}: dimensions now come from {hf_dir}/config.json")
        del model["preset"]
    for key in DIMENSION_KEYS:
        if key in model and model[key] != dims[key]:
            notes.append(f"removed model.{key} = {model[key]!r}: the checkpoint has {dims[key]!r}")
            del model[key]
    return notes


def _assign(doc, key: str, text: str, manifest_dir: Path, created: list) -> list[str]:
    *path, (name, index) = _parts(key)
    node = doc
    for part, part_index in path:
        node = _step(node, part, part_index, key, create=True, created=created)
    if index is not None:
        raise UserError(f"{key}: give a key inside the entry, like {key}.ip")
    if not isinstance(node, dict):
        raise UserError(f"{key}: the part before {name!r} is not a table")
    value = parse_value(text)
    old = node.get(name)
    _put(node, name, value)
    report = [f"{key} = {json.dumps(_plain(value), ensure_ascii=False, default=str)}"
              + ("" if old is None else f" (was {json.dumps(_plain(old), ensure_ascii=False, default=str)})")]
    if key == "model.hf_dir":
        report += _switch_to_checkpoint(doc, manifest_dir, str(value))
    return report


def _put(table, name: str, value) -> None:
    """Set a key; a new one goes after the table's last line, before the blank lines that end it (which keep
    tables apart)."""
    body = getattr(getattr(table, "value", None), "body", None)
    if name in table or not body:
        table[name] = value
        return
    end = len(body)
    while end and body[end - 1][0] is None and isinstance(body[end - 1][1], Whitespace):
        end -= 1
    try:
        table.value._insert_at(end, name, value)
        item = body[end][1]
        if not item.trivia.trail.endswith("\n"):
            item.trivia.trail += "\n"  # its own line: the blank line after it stays a blank line
    except (AttributeError, ValueError, IndexError):  # tomlkit's layout not as expected: append, as it would
        table[name] = value


def _remove(doc, key: str) -> str:
    *path, (name, index) = _parts(key)
    node = doc
    for part, part_index in path:
        node = _step(node, part, part_index, key, create=False)
    if not isinstance(node, dict) or name not in node:
        raise UserError(f"{key} is not in the manifest")
    if index is None:
        del node[name]
        return f"removed {key}"
    items = node[name]
    if index == "+" or not isinstance(items, list):
        raise UserError(f"{key}: name an existing entry to remove, like {name}[1]")
    try:
        del items[int(index)]
    except IndexError:
        raise UserError(f"{key}: {name} has {len(items)} entries") from None
    return f"removed {key}"


def _appended_tables(doc, changes) -> list:
    """The array entries that `[+]` created, once each."""
    out = []
    for key, _ in changes:
        node = doc
        for name, index in _parts(key)[:-1]:
            node = node[name] if index is None else node[name][-1 if index == "+" else int(index)]
            if index == "+" and not any(node is t for t in out):
                out.append(node)
    return out


def set_keys(path: Path, changes: list[tuple[str, str]], removals: list[str] = ()) -> list[str]:
    """Assign `changes` [(key path, TOML value text)] and delete `removals`, then validate the whole manifest;
    the file is replaced only when it is valid. Lines of the report that start with "warning:" name what the
    manifest refers to that is not there yet (a checkpoint still downloading)."""
    target = real_file(path)
    written = read_manifest_text(target)
    doc, original = parse_toml(target)
    report = []
    for key in removals:
        report.append(_remove(doc, key))
    created = []
    for key, text in changes:
        report += _assign(doc, key, text, target.parent, created)
    for table in _appended_tables(doc, changes) + created:
        table.add(tomlkit.nl())  # a blank line after a new entry or table, like the others have
    edited = _as_written(tomlkit.dumps(doc), written)
    manifest = _validated(target, edited, original, path)
    write_through(target, edited.encode("utf-8"))
    # the edit is written: warnings name the lines of the file as it is now
    warnings = [f"warning: {p}" for p in _in_the_file(manifest.unavailable + manifest.warnings,
                                                      edited.removeprefix(BOM), path)]
    return report + warnings + [f"updated {path}" + (f" (the file it links to, {target})" if Path(path).is_symlink()
                                                     else "")]


def _as_written(text: str, written: str) -> str:
    """The edited text in the file's own conventions: its line endings (CRLF when most lines end so) and BOM."""
    text = text.replace("\r\n", "\n")
    if written.count("\r\n") * 2 > written.count("\n"):
        text = text.replace("\n", "\r\n")
    return (BOM + text) if written.startswith(BOM) else text


def _in_the_file(problems: list, original: str, shown: Path) -> list:
    """Problems found in the edited text, named by the user's file and the line where each key stands in it now
    (the file is unchanged when they stop the edit)."""
    lines = key_lines(original)
    for p in problems:
        p.file = str(shown)
        if p.key:
            p.line = line_of(lines, p.key)
    return problems


def _validated(target: Path, edited: str, original: str, shown: Path):
    """The edited manifest loaded from a temporary beside the file (relative paths resolve as they will); problems
    name the user's file and the lines where the keys stand in it now."""
    tmp = tmp_sibling(target, "tmp")
    try:
        try:
            tmp.write_text(edited, encoding="utf-8", newline="")
        except OSError as exc:
            raise UserError(f"cannot write beside {target}: {exc.strerror}; it was not changed",
                            hint="check the permissions of its directory") from None
        return load_manifest(tmp)
    except ManifestError as exc:
        raise ManifestError(_in_the_file(exc.problems, original, shown)) from None
    finally:
        with contextlib.suppress(OSError):
            remove(tmp)
