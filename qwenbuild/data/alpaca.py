"""alpaca (instruction/input/output) -> ChatML JSON Lines, with the original converter's exact text rules."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator

from qwenbuild.data.chatml import _kind, conversation, message_problem, render
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import BadJSON, parse_json, read_bytes
from qwenbuild.store import atomic_path

logger = logging.getLogger(__name__)

_SHOWN_PROBLEMS = 10


@dataclasses.dataclass
class AlpacaStats:
    rows: int = 0
    skipped: int = 0


def user_text(instruction: str, input_: str) -> str:
    """The original rule: with an input, drop one trailing '.' of the instruction and join with ': '."""
    if input_ == "":
        return instruction
    if instruction.endswith("."):
        instruction = instruction[:-1]
    return instruction + ": " + input_


def row_problem(row) -> str | None:
    """Why an alpaca row cannot be converted, or None when it can."""
    if not isinstance(row, dict):
        return f"expected an object with instruction/input/output, found {_kind(row)}"
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if key not in row:
            if required:
                return f'missing "{key}"'
            continue
        value = row[key]
        if not isinstance(value, str):
            return f'"{key}" must be a string, found {_kind(value)}'
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f'"{key}" is not valid UTF-8 text'
    if not row["instruction"].strip():
        return 'empty "instruction"'
    return None


def _decode(raw: bytes) -> str:
    # invalid bytes survive as lone surrogates, so the row holding them can be named
    return raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")


def read_rows(data_path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a JSON array or a JSON Lines file; where names the row index (and line)."""
    path = Path(data_path)
    try:
        raw = read_bytes(path, "alpaca data file")
    except FileNotFoundError:
        raise UserError(f"alpaca data file {path} does not exist")
    except IsADirectoryError:
        raise UserError(f"alpaca data path {path} is a directory", hint="pass the JSON or JSONL file itself")
    text = _decode(raw)
    if text.lstrip().startswith("["):
        yield from _array_rows(path, text)
    else:
        _refuse_one_object(path, text)
        yield from _line_rows(path, text)


def _refuse_one_object(path: Path, text: str) -> None:
    """A pretty-printed single object is one row written wrong, not one bad row per line."""
    if not text.lstrip().startswith("{") or len(text.strip().splitlines()) < 2:
        return
    try:
        whole = parse_json(text)
    except BadJSON:
        return
    if isinstance(whole, dict):
        raise UserError(f"{path} holds one JSON object spread over several lines, not rows",
                        hint="alpaca data is a JSON array of rows ([{...}, {...}]) or JSON Lines (one row per "
                             "line); wrap the object in [ ] to convert it as one row")


def _array_rows(path: Path, text: str) -> Iterator[tuple[str, object]]:
    try:
        rows = parse_json(text)
    except BadJSON as exc:
        raise UserError(f"{path} is not valid JSON: {exc}",
                        hint="the file must be a JSON array of rows, or JSON Lines with one row per line")
    for i, row in enumerate(rows):
        yield f"row {i}", row


class _BadLine:
    def __init__(self, problem: str):
        self.problem = problem


def _line_rows(path: Path, text: str) -> Iterator[tuple[str, object]]:
    index = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except BadJSON as exc:
            row = _BadLine(f"not valid JSON ({exc})")
        yield f"row {index} (line {lineno})", row
        index += 1


def convert_alpaca(data_path: str | os.PathLike, output_path: str | os.PathLike,
                   skip_bad_rows: bool = False) -> AlpacaStats:
    """Write one ChatML conversation per alpaca row as UTF-8 JSON Lines; bad rows stop the run or are skipped."""
    stats, problems = AlpacaStats(), []
    with atomic_path(output_path, inputs=[data_path]) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for where, row in read_rows(data_path):
            problem = row.problem if isinstance(row, _BadLine) else row_problem(row)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            text = user_text(row["instruction"], row.get("input", ""))
            out.write(json.dumps(conversation(text, row["output"]), ensure_ascii=False) + "\n")
            stats.rows += 1
        if problems and not skip_bad_rows:
            raise UserError(_problem_report(data_path, problems),
                            hint="fix these rows, or pass --skip_bad_rows to convert the others")
        if stats.rows == 0:
            raise UserError(f"{data_path} has no convertible rows", hint="expected alpaca rows with "
                            '"instruction", optional "input" and "output" strings')
    stats.skipped = len(problems)
    if problems:
        logger.warning(_problem_report(data_path, problems, verb="skipped"))
    logger.info(f"alpaca_converter: {stats.rows} conversations -> {output_path}"
                + (f" ({stats.skipped} bad rows skipped)" if stats.skipped else ""))
    return stats


def _problem_report(data_path, problems: list[str], verb: str = "found") -> str:
    shown = "\n".join(f"  {p}" for p in problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    return f"{len(problems)} bad row(s) {verb} in {data_path}:\n{shown}{more}"


def alpaca_corpus(data_path: str | os.PathLike) -> list[str]:
    """The ChatML text of every row, as the model will see it: the corpus to train a small tokenizer on.

    Rows may be alpaca rows or already converted ChatML records (a "messages" list), in a JSON array or JSON Lines.
    """
    texts, problems = [], []
    for where, row in read_rows(data_path):
        if isinstance(row, dict) and "messages" in row:
            problem = message_problem(row["messages"])
            messages = row["messages"]
        else:
            problem = row.problem if isinstance(row, _BadLine) else row_problem(row)
            messages = None if problem else conversation(user_text(row["instruction"], row.get("input", "")),
                                                         row["output"])["messages"]
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        texts.append(render(messages))
    if problems:
        raise UserError(_problem_report(data_path, problems), hint="fix these rows first")
    return texts
