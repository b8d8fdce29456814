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
    assert any("\u4e00" <= ch <= "\u9fff" for r in train for ch in r["instruction"])
    assert sum(r["input"] != "" for r in train) > 1000 and sum(r["input"] == "" for r in train) > 1000


def test_answers_follow_the_rules(split):
    for r in split[0] + split[1]:
        task, text, out = r["task"], r["input"], r["output"]
        if task == "reverse_letters" or task == "zh_reverse":
            assert out.split() == text.split()[::-1]
        elif task in ("copy_words", "zh_copy"):
            assert out == text
        elif task == "uppercase_letters":
            assert out == text.upper()
        elif task == "next_letters":
            assert [ord(b) - ord(a) for a, b in zip(text.split(), out.split())] == [1] * len(text.split())
        elif task == "count_letters":
            assert int(out) == len(text.split())
        elif task == "add_small":
            a, b = r["instruction"].removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(out) == int(a) + int(b)
        elif task == "zh_digits":
            assert out == "".join("零一二三四五六七八九"[int(d)] for d in text.split())
    assert ins.zh_number_word.__name__ in ins.TASKS
    words = {int(r["instruction"].split()[0]): r["output"] for r in split[0] if r["task"] == "zh_number_word"}
    assert words.get(11, "十一") == "十一" and words.get(20, "二十") == "二十" and words.get(35, "三十五") == "三十五"
    assert all(len(w) <= 3 for w in words.values())


def test_rows_are_short_with_the_small_tokenizer(split, tmp_path):
    train, heldout = split
    tok = load_tokenizer(train_tokenizer(ins.tokenizer_corpus(train), 640, tmp_path / "tok"))
    lengths = np.array([len(tok(t).input_ids) for t in ins.tokenizer_corpus(heldout)])
    assert lengths.max() < 64 and 25 < lengths.mean() < 45
    prompt, answer = ins.eval_examples(heldout[:1])[0]
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and answer == heldout[0]["output"]
    assert tok(prompt + answer + "<|im_end|>\n").input_ids == tok(ins.tokenizer_corpus(heldout[:1])[0]).input_ids


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
