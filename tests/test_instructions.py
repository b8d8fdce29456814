"""The project's instruction dataset: deterministic, correct answers, disjoint held-out split, short rows."""

import json

import numpy as np
import pytest

from qwenbuild.data import instructions as ins
from qwenbuild.data.alpaca import convert_alpaca
from qwenbuild.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def split():
    return ins.make_instructions(seed=0, num_train=4000, num_heldout=400)


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    a = ins.write_instruction_dataset(tmp_path / "a", seed=3, num_train=300, num_heldout=30)
    b = ins.write_instruction_dataset(tmp_path / "b", seed=3, num_train=300, num_heldout=30)
    c = ins.write_instruction_dataset(tmp_path / "c", seed=4, num_train=300, num_heldout=30)
    assert [p.name for p in a] == ["train.json", "heldout.json"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    rows = json.loads(a[0].read_text(encoding="utf-8"))
    assert len(rows) == 300 and set(rows[0]) == {"instruction", "input", "output", "task"}


def test_heldout_prompts_are_new_and_every_task_is_covered(split):
    train, heldout = split
    seen = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in seen for r in heldout)
    assert len({(r["instruction"], r["input"]) for r in heldout}) == len(heldout) == 400
    assert {r["task"] for r in heldout} == {r["task"] for r in train} == set(ins.TASKS)
    chinese = [r for r in train if any("\u4e00" <= ch <= "\u9fff" for ch in r["instruction"])]
    assert {r["task"] for r in chinese} == TASKS_ZH and 1000 < len(chinese) < 2000


TASKS_ZH = {"zh_digits", "zh_to_digits", "zh_reverse_digits", "zh_next_letters", "zh_even_odd", "zh_kg_to_g"}
ZH = "零一二三四五六七八九"


def _next(text: str) -> str:
    return "".join(" " + chr(ord(c) + 1) for c in text.split())


def test_answers_follow_the_rules(split):
    rules = {
        "copy_digits": lambda t: t, "reverse_digits": lambda t: t[::-1], "zh_reverse_digits": lambda t: t[::-1],
        "add_one_digits": lambda t: "".join(str((int(d) + 1) % 10) for d in t),
        "next_letters": _next, "zh_next_letters": _next,
        "reverse_letters": lambda t: "".join(" " + c for c in t.split()[::-1]),
        "last_letter": lambda t: " " + t.split()[-1], "count_letters": lambda t: str(len(t.split())),
        "even_odd": lambda t: "odd" if int(t) % 2 else "even",
        "zh_even_odd": lambda t: "单数" if int(t) % 2 else "双数",
        "km_to_m": lambda t: t.replace(" km", "000 m"), "zh_kg_to_g": lambda t: t.replace(" 千克", "000 克"),
        "zh_digits": lambda t: "".join(" " + ZH[int(d)] for d in t),
        "zh_to_digits": lambda t: "".join(str(ZH.index(c)) for c in t.split()),
    }
    assert set(rules) == set(ins.TASKS)
    for r in split[0] + split[1]:
        assert r["output"] == rules[r["task"]](r["input"]), r


def test_every_item_is_one_token_so_answers_sit_at_fixed_distances(tmp_path):
    # the default manifest's split: the tokenizer's vocab_size is all its training text supports
    train, heldout = ins.make_instructions(seed=0, num_train=4000, num_heldout=200)
    tok = load_tokenizer(train_tokenizer(ins.tokenizer_corpus(train), 505, tmp_path / "tok"))
    lengths = np.array([len(tok(t).input_ids) for t in ins.tokenizer_corpus(train + heldout)])
    assert lengths.max() <= 41 and 25 < lengths.mean() < 40
    shapes: dict[str, set] = {}
    for r in train + heldout:
        prompt, answer = ins.eval_examples([r])[0]
        n = len(tok(prompt).input_ids)
        full = tok(prompt + answer + "<|im_end|>\n").input_ids
        assert full == tok(ins.tokenizer_corpus([r])[0]).input_ids
        shapes.setdefault(r["task"], set()).add((n, len(full) - n))
    # the answer of every task but counting has one length, and so has its prompt
    assert all(len(s) == 1 for task, s in shapes.items() if task != "count_letters"), shapes
    copy = next(r for r in heldout if r["task"] == "reverse_letters")
    ids = tok(ins.tokenizer_corpus([copy])[0]).input_ids
    # " a" in the prompt and " a" in the answer are the same token
    assert ids[-4:-2] == ids[-10:-12:-1]
    prompt, answer = ins.eval_examples(heldout[:1])[0]
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and answer == heldout[0]["output"]


def test_converter_accepts_the_files_and_renders_the_same_text(tmp_path):
    train_path, _ = ins.write_instruction_dataset(tmp_path, seed=0, num_train=50, num_heldout=5)
    convert_alpaca(train_path, tmp_path / "train.jsonl")
    rows = json.loads(train_path.read_text(encoding="utf-8"))
    from qwenbuild.data.chatml import render

    converted = [render(json.loads(line)["messages"])
                 for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert converted == ins.tokenizer_corpus(rows)


def test_exact_match():
    assert ins.exact_match(["a b", " 12\n", "x"], ["a b", "12", "y"]) == pytest.approx(2 / 3)
    assert ins.exact_match([], []) == 0.0


def test_command_writes_both_files(tmp_path):
    from qwenbuild.cli import main

    assert main(["instructions", "--output_dir", str(tmp_path), "--seed", "3", "--num_train", "300",
                 "--num_heldout", "30"]) == 0
    expected = ins.write_instruction_dataset(tmp_path / "direct", seed=3, num_train=300, num_heldout=30)
    assert [(tmp_path / p.name).read_bytes() for p in expected] == [p.read_bytes() for p in expected]
