"""The text a small tokenizer is trained on, read from files: ChatML of alpaca or ChatML rows, or plain text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from qwenbuild.data.alpaca import alpaca_corpus
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import refuse_device


def corpus_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """.json/.jsonl files are alpaca or ChatML rows, rendered as the ChatML preprocess will tokenize; other files
    are plain UTF-8 text, line by line."""
    for item in paths:
        path = Path(item)
        if path.suffix in (".json", ".jsonl"):
            rows = alpaca_corpus(path)
            if not rows:
                raise UserError(f"tokenizer training file {path} holds no rows")
            yield from rows
        else:
            yield from _text_lines(path)


def _text_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            refuse_device(f, path, "tokenizer training file")
            empty = True
            for line in f:
                empty = False
                yield line
        if empty:
            raise UserError(f"tokenizer training file {path} is empty")
    except FileNotFoundError:
        raise UserError(f"tokenizer training file {path} does not exist")
    except UnicodeDecodeError as exc:
        raise UserError(f"tokenizer training file {path} is not UTF-8 text: {exc}")
