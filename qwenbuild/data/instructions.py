"""The project's own instruction dataset: small English and Chinese tasks a tiny model can learn to answer exactly.

Every answer is a direct function of tokens visible in the prompt (copy, reverse, uppercase, next letter, add a
little, unit conversion by a fixed rule, digits read in Chinese), and lists and numbers have a fixed length per
task, so each answer token sits at a fixed distance from the token it depends on: a model of a few million
parameters learns that from relative positions much sooner than general copying.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Callable

from qwenbuild.data.alpaca import user_text
from qwenbuild.data.chatml import SYSTEM_PROMPT, prompt, render
from qwenbuild.store import atomic_path

TRAIN_FILE, HELDOUT_FILE = "train.json", "heldout.json"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("cat dog sun moon tree book fish bird star rain snow king milk road ship lamp door cake blue red "
         "green hat cup box pen map egg leaf rock wind fire sea sky").split()
ZH_WORDS = "山 水 火 木 花 鸟 鱼 月 日 云 雨 风 天 地 人 门 书 马 牛 羊 米 茶 田 石".split()
ZH_DIGITS = "零一二三四五六七八九"

Row = tuple[str, str, str]  # instruction, input, output


def _letters(rng: random.Random, n: int = 4, pool: str = LETTERS) -> list[str]:
    return [rng.choice(pool) for _ in range(n)]


def _words(rng: random.Random, pool, n: int = 3) -> list[str]:
    return [rng.choice(pool) for _ in range(n)]


def copy_words(rng):
    words = " ".join(_words(rng, WORDS))
    return "Repeat the words.", words, words


def reverse_letters(rng):
    letters = _letters(rng)
    return "Reverse the letters.", " ".join(letters), " ".join(reversed(letters))


def uppercase_letters(rng):
    letters = " ".join(_letters(rng))
    return "Write the letters in uppercase.", letters, letters.upper()


def next_letters(rng):
    letters = _letters(rng, 3, LETTERS[:-1])
    return "Write the letter that comes after each letter.", " ".join(letters), \
        " ".join(LETTERS[LETTERS.index(c) + 1] for c in letters)


def last_word(rng):
    words = _words(rng, WORDS)
    return f"What is the last word in: {' '.join(words)}?", "", words[-1]


def count_letters(rng):
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 7))]
    return "How many letters are there?", " ".join(letters), str(len(letters))


def add_small(rng):
    a, b = rng.randint(10, 89), rng.randint(1, 9)
    return f"What is {a} + {b}?", "", str(a + b)


def next_number(rng):
    n = rng.randint(100, 998)
    return f"What number comes after {n}?", "", str(n + 1)


def km_to_m(rng):
    n = rng.randint(10, 99)
    return f"Convert {n} km to meters.", "", f"{n}000 m"


def zh_copy(rng):
    words = " ".join(_words(rng, ZH_WORDS))
    return "重复下面的字", words, words


def zh_reverse(rng):
    words = _words(rng, ZH_WORDS)
    return "把下面的字倒过来", " ".join(words), " ".join(reversed(words))


def zh_digits(rng):
    digits = _letters(rng, 4, "0123456789")
    return "用中文写出每个数字", " ".join(digits), "".join(ZH_DIGITS[int(d)] for d in digits)


def zh_number_word(rng):
    n = rng.randint(11, 99)
    tens, ones = divmod(n, 10)
    word = ("十" if tens == 1 else ZH_DIGITS[tens] + "十") + (ZH_DIGITS[ones] if ones else "")
    return f"{n} 用中文怎么写？", "", word


def zh_next_number(rng):
    n = rng.randint(10, 98)
    return f"{n} 后面的数是几？", "", str(n + 1)


def zh_kg_to_g(rng):
    n = rng.randint(10, 99)
    return f"{n} 千克是多少克？", "", f"{n}000 克"


TASKS: dict[str, Callable[[random.Random], Row]] = {f.__name__: f for f in (
    copy_words, reverse_letters, uppercase_letters, next_letters, last_word, count_letters, add_small,
    next_number, km_to_m, zh_copy, zh_reverse, zh_digits, zh_number_word, zh_next_number, zh_kg_to_g)}


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
    train, heldout = make_instructions(seed, num_train, num_heldout)
    output_dir = Path(output_dir)
    paths = output_dir / TRAIN_FILE, output_dir / HELDOUT_FILE
    for path, rows in zip(paths, (train, heldout)):
        _write_rows(path, rows)
    print(f"instructions: {len(train)} train + {len(heldout)} held-out rows, {len(TASKS)} tasks, seed {seed} "
          f"-> {output_dir}", file=sys.stderr)
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
