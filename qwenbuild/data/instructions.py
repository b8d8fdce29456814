"""The project's own instruction dataset: small English and Chinese tasks a tiny model can learn to answer exactly.

Every answer item is a function of one token visible in the prompt (copy, reverse, next letter, add one,
digit read in Chinese, even or odd), and every task has a fixed number of items, so each answer token sits at a
fixed distance from the token it depends on: a model of a million parameters learns that from relative positions
much sooner than general copying. Items are digits (the Qwen pre-tokenizer keeps each digit a token of its own) or
space-separated letters and Chinese numerals, whose lists in the answer also start with a space, so an answer
token is the very token it copies from the prompt (the tokenizer of the default manifest makes each one token).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Callable

from qwenbuild.data.alpaca import user_text
from qwenbuild.data.chatml import SYSTEM_PROMPT, prompt, render
from qwenbuild.store import atomic_path, refuse_not_a_directory

logger = logging.getLogger(__name__)

TRAIN_FILE, HELDOUT_FILE = "train.json", "heldout.json"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
ZH_DIGITS = "零一二三四五六七八九"

Row = tuple[str, str, str]  # instruction, input, output


def _pick(rng: random.Random, pool, n: int) -> list[str]:
    return [rng.choice(pool) for _ in range(n)]


def _spaced(items) -> str:
    """ a b c: the leading space makes the first item the same token as in the prompt, where it follows ': '."""
    return "".join(" " + i for i in items)


def copy_digits(rng):
    digits = "".join(_pick(rng, DIGITS, 3))
    return "Repeat the digits.", digits, digits


def reverse_digits(rng):
    digits = "".join(_pick(rng, DIGITS, 3))
    return "Reverse the digits.", digits, digits[::-1]


def add_one_digits(rng):
    digits = _pick(rng, DIGITS, 3)
    return "Add one to each digit.", "".join(digits), "".join(str((int(d) + 1) % 10) for d in digits)


def next_letters(rng):
    letters = _pick(rng, LETTERS[:-1], 2)
    return "Write the letter that comes after each letter.", " ".join(letters), \
        _spaced(LETTERS[LETTERS.index(c) + 1] for c in letters)


def reverse_letters(rng):
    letters = _pick(rng, LETTERS, 2)
    return "Reverse the letters.", " ".join(letters), _spaced(reversed(letters))


def last_letter(rng):
    letters = _pick(rng, LETTERS, 3)
    return "What is the last letter?", " ".join(letters), " " + letters[-1]


def count_letters(rng):
    letters = _pick(rng, LETTERS, rng.randint(2, 7))
    return "How many letters are there?", " ".join(letters), str(len(letters))


def even_odd(rng):
    n = rng.randint(100, 999)
    return "Is the number even or odd?", str(n), "odd" if n % 2 else "even"


def km_to_m(rng):
    n = rng.randint(100, 999)
    return "Convert kilometers to meters.", f"{n} km", f"{n}000 m"


def zh_digits(rng):
    digits = _pick(rng, DIGITS, 3)
    return "用中文写出数字", "".join(digits), _spaced(ZH_DIGITS[int(d)] for d in digits)


def zh_to_digits(rng):
    digits = _pick(rng, DIGITS, 3)
    return "写成阿拉伯数字", " ".join(ZH_DIGITS[int(d)] for d in digits), "".join(digits)


def zh_reverse_digits(rng):
    digits = "".join(_pick(rng, DIGITS, 3))
    return "把数字倒过来", digits, digits[::-1]


def zh_next_letters(rng):
    letters = _pick(rng, LETTERS[:-1], 2)
    return "写出后面的字母", " ".join(letters), _spaced(LETTERS[LETTERS.index(c) + 1] for c in letters)


def zh_even_odd(rng):
    n = rng.randint(100, 999)
    return "是单数还是双数？", str(n), "单数" if n % 2 else "双数"


def zh_kg_to_g(rng):
    n = rng.randint(100, 999)
    return "千克换算成克", f"{n} 千克", f"{n}000 克"


TASKS: dict[str, Callable[[random.Random], Row]] = {f.__name__: f for f in (
    copy_digits, reverse_digits, add_one_digits, next_letters, reverse_letters, last_letter, count_letters,
    even_odd, km_to_m, zh_digits, zh_reverse_digits, zh_to_digits, zh_next_letters, zh_even_odd, zh_kg_to_g)}


def _draw(rng: random.Random, count: int, avoid: set[tuple[str, str]], unique: bool) -> list[dict]:
    """`count` rows cycling through the tasks, never repeating a prompt in `avoid` (nor their own if unique)."""
    rows, names = [], list(TASKS)
    while len(rows) < count:
        name = names[len(rows) % len(names)]
        for _ in range(1000):
            instruction, input_, output = TASKS[name](rng)
            if (instruction, input_) not in avoid:
                break
        else:
            raise RuntimeError(f"task {name} has run out of new instances")
        if unique:
            avoid.add((instruction, input_))
        rows.append({"instruction": instruction, "input": input_, "output": output, "task": name})
    return rows


def make_instructions(seed: int, num_train: int, num_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout) alpaca rows; held-out prompts are distinct and never occur in train."""
    rng, heldout_prompts = random.Random(seed), set()
    heldout = _draw(rng, num_heldout, heldout_prompts, unique=True)
    train = _draw(rng, num_train, heldout_prompts, unique=False)
    rng.shuffle(train)
    return train, heldout


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        tmp.write_text(f"[\n{body}\n]\n", encoding="utf-8")


def write_instruction_dataset(output_dir: str | os.PathLike, seed: int = 0, num_train: int = 4000,
                              num_heldout: int = 400) -> tuple[Path, Path]:
    """Write train.json and heldout.json (alpaca JSON arrays with an extra "task" key) into output_dir."""
    refuse_not_a_directory(output_dir)
    train, heldout = make_instructions(seed, num_train, num_heldout)
    output_dir = Path(output_dir)
    paths = output_dir / TRAIN_FILE, output_dir / HELDOUT_FILE
    for path, rows in zip(paths, (train, heldout)):
        _write_rows(path, rows)
    logger.info(f"instructions: {len(train)} train + {len(heldout)} held-out rows, {len(TASKS)} tasks, seed {seed} "
                f"-> {output_dir}")
    return paths


def messages(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_text(row["instruction"], row.get("input", ""))}]


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """The ChatML text the model is trained on, one conversation per item, for train_tokenizer."""
    return [render(messages(r) + [{"role": "assistant", "content": r["output"]}]) for r in rows]


def eval_examples(rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt text ending in the assistant header, expected answer) for exact-match evaluation."""
    return [(prompt(messages(r)), r["output"]) for r in rows]


def exact_match(predictions: list[str], expected: list[str]) -> float:
    """Share of answers equal to the expected one after stripping surrounding whitespace."""
    if not expected:
        return 0.0
    return sum(p.strip() == e.strip() for p, e in zip(predictions, expected)) / len(expected)
