"""The small tokenizer trained on the project's dataset: same format, exact size, reproducible bytes."""

import json
import os
import subprocess
import sys

import pytest

from qwenbuild.data.instructions import make_instructions, tokenizer_corpus
from qwenbuild.errors import UserError
from qwenbuild.tokenizer import bpe_pipeline, load_tokenizer, train_tokenizer

VOCAB_SIZE = 500
TEXTS = ["Reverse the letters: a b c", "把下面的字倒过来: 山 水 火", "emoji 😀 not in the corpus", "tabs\tand\n\nnewlines  ",
         "<|im_start|>user\nWhat is 12 + 3?<|im_end|>\n<|im_start|>assistant\n15<|im_end|>\n"]


@pytest.fixture(scope="module")
def corpus():
    train, _ = make_instructions(seed=0, num_train=4000, num_heldout=400)
    return tokenizer_corpus(train)


@pytest.fixture(scope="module")
def small_dir(corpus, tmp_path_factory):
    return train_tokenizer(corpus, VOCAB_SIZE, tmp_path_factory.mktemp("small") / "tok")


def test_size_and_specials_follow_the_regular_tokens(small_dir):
    vocab = json.loads((small_dir / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE - 3))
    merges = (small_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len(merges) - 2 == VOCAB_SIZE - 3 - 256
    tok = load_tokenizer(small_dir)
    assert len(tok) == VOCAB_SIZE
    assert tok.pad_token_id == tok.eos_token_id == VOCAB_SIZE - 3
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [VOCAB_SIZE - 2, VOCAB_SIZE - 1]


def test_fast_slow_and_pipeline_agree_and_round_trip(small_dir):
    from transformers import Qwen2Tokenizer

    fast, slow = load_tokenizer(small_dir), Qwen2Tokenizer.from_pretrained(str(small_dir))
    pipeline, _ = bpe_pipeline(small_dir / "vocab.json", small_dir / "merges.txt")
    for text in TEXTS:
        ids = slow(text).input_ids
        assert fast(text).input_ids == ids == pipeline.encode(text, add_special_tokens=False).ids
        assert fast.decode(ids) == text
    # the corpus' own words are single tokens; unseen text falls back to bytes
    assert fast.convert_ids_to_tokens(fast(" letters").input_ids) == ["Ġletters"]
    assert len(fast("😀").input_ids) == 4


def test_bytes_identical_across_runs_and_thread_counts(small_dir, corpus, tmp_path):
    again = train_tokenizer(corpus, VOCAB_SIZE, tmp_path / "again")
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("".join(corpus), encoding="utf-8")
    script = ("import sys; from qwenbuild.tokenizer import train_tokenizer; "
              "from qwenbuild.data.corpus import corpus_texts; "
              f"train_tokenizer(corpus_texts([sys.argv[1]]), {VOCAB_SIZE}, sys.argv[2])")
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(corpus_file), str(tmp_path / "one")], check=True, env=env)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        expected = (small_dir / name).read_bytes()
        assert (again / name).read_bytes() == expected
        assert (tmp_path / "one" / name).read_bytes() == expected


def test_impossible_sizes_are_user_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(corpus, 200, tmp_path / "tiny")
    with pytest.raises(UserError, match="supports only"):
        train_tokenizer(corpus[:50], 5000, tmp_path / "huge")
    assert not (tmp_path / "huge").exists()


def test_command_trains_from_alpaca_files(small_dir, tmp_path, capsys):
    from qwenbuild.cli import main
    from qwenbuild.data.instructions import write_instruction_dataset

    train_path, _ = write_instruction_dataset(tmp_path / "data", seed=0, num_train=4000, num_heldout=400)
    assert main(["tokenizer", "--output_dir", str(tmp_path / "tok"), "--train_from", str(train_path),
                 "--vocab_size", str(VOCAB_SIZE)]) == 0
    assert len(load_tokenizer(tmp_path / "tok")) == VOCAB_SIZE
    # the same rows as the library call trained on: the same files, byte for byte
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (small_dir / name).read_bytes(), name
    capsys.readouterr()
    assert main(["tokenizer", "--output_dir", str(tmp_path / "x"), "--vocab_size", "640"]) == 2
    assert "--vocab_size only applies with --train_from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_alpaca_and_chatml_files_train_the_same_tokenizer_as_the_text(small_dir, tmp_path):
    from qwenbuild.data.alpaca import convert_alpaca
    from qwenbuild.data.corpus import corpus_texts
    from qwenbuild.data.instructions import write_instruction_dataset

    train_path, _ = write_instruction_dataset(tmp_path / "data", seed=0, num_train=4000, num_heldout=400)
    convert_alpaca(train_path, tmp_path / "chatml.jsonl")
    for source in (train_path, tmp_path / "chatml.jsonl"):
        out = train_tokenizer(corpus_texts([source]), VOCAB_SIZE, tmp_path / source.stem)
        for name in ("vocab.json", "merges.txt"):
            assert (out / name).read_bytes() == (small_dir / name).read_bytes()
