"""The first difference between two versions of an artifact: a tensor, a row, a line or a JSON field."""

from __future__ import annotations

import json
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.weights.mindspore_ckpt import read_tensors


def _first_json_difference(a, b, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"field {path or '(top)'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"field {path}.{key}: present in only one" if path else f"field {key}: present in only one"
            found = _first_json_difference(a[key], b[key], f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"field {path}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_json_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"field {path}: {a!r} != {b!r}"


def _ckpt(a: Path, b: Path) -> str | None:
    ta, tb = {t.name: t for t in read_tensors(a)}, {t.name: t for t in read_tensors(b)}
    for name in list(ta) + [n for n in tb if n not in ta]:
        if name not in ta or name not in tb:
            return f"tensor {name}: present in only one"
        x, y = ta[name], tb[name]
        if (x.shape, x.type_name) != (y.shape, y.type_name):
            return f"tensor {name}: {x.type_name}{list(x.shape)} vs {y.type_name}{list(y.shape)}"
        if b"".join(x.chunks()) != b"".join(y.chunks()):
            return f"tensor {name}: values differ"
    return None


def _mindrecord(a: Path, b: Path) -> str | None:
    # mindspore takes seconds to load: imported only when this runs
    import mindspore.dataset as ds

    try:
        rows_a = ds.MindDataset(str(a), shuffle=False).create_dict_iterator(output_numpy=True, num_epochs=1)
        rows_b = ds.MindDataset(str(b), shuffle=False).create_dict_iterator(output_numpy=True, num_epochs=1)
        for i, (x, y) in enumerate(zip(rows_a, rows_b)):
            for column in sorted(set(x) | set(y)):
                if column not in x or column not in y or x[column].tolist() != y[column].tolist():
                    return f"row {i}, column {column}"
    except RuntimeError as exc:  # MindSpore's reader on a damaged or partial MindRecord
        raise UserError(f"{a.name}: {exc}") from None
    return None


def _lines(a: Path, b: Path) -> str | None:
    la, lb = a.read_bytes().splitlines(), b.read_bytes().splitlines()
    for i, (x, y) in enumerate(zip(la, lb), start=1):
        if x != y:
            return f"line {i}"
    return None if len(la) == len(lb) else f"line {min(len(la), len(lb)) + 1}: one file is longer"


def first_difference(a: Path, b: Path) -> str:
    """Where two files first differ, in the terms of their format."""
    a, b = Path(a), Path(b)
    try:
        if a.suffix == ".ckpt":
            found = _ckpt(a, b)
        elif a.suffix == ".mindrecord":
            found = _mindrecord(a, b)
        elif a.suffix == ".json":
            try:
                found = _first_json_difference(json.loads(a.read_text()), json.loads(b.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                found = _lines(a, b)
        elif a.suffix == ".mindir":
            found = "graph differs after normalisation (compile_phase and primitive order ignored)"
        else:
            found = _lines(a, b)
    except (OSError, UserError) as exc:  # a missing or damaged file is itself the difference
        found = f"unreadable: {exc}"
    return found or "bytes differ"
