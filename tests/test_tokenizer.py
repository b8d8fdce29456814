"""The real Qwen1.5 tokenizer rebuilt from qwen.tiktoken: contents, known ids, and equality with the slow reference."""

import base64
import json

import pytest

from qwenbuild.errors import UserError
from qwenbuild.tokenizer import bpe_pipeline, load_tokenizer
from qwenbuild.tokenizer.byte_level import byte_to_char, token_bytes, token_text
from qwenbuild.tokenizer.files import special_ids
from qwenbuild.tokenizer.qwen import merges_from_ranks, read_tiktoken

MIXED_TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？我想去北京看看长城。",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 22))\r\n",
    "Emoji 😀👍🏽 and flags 🇨🇳 mixed with 中文 and café (cafe\u0301 composes under NFC)",
    "I'LL say it's    spaced   out\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 -42 1e10 ١٢٣",
    "<|im_start|>user\nwhat is <b>HTML</b>?<|im_end|>\n<|im_start|>assistant\n",
    "日本語のテキストと한국어 텍스트 and Русский текст",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="session")
def qwen_fast(qwen_dir):
    return load_tokenizer(qwen_dir)


@pytest.fixture(scope="session")
def qwen_slow(qwen_dir):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(qwen_dir))


def test_files_have_the_published_sizes_and_specials(qwen_dir):
    vocab = json.loads((qwen_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (qwen_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151_643 and sorted(vocab.values()) == list(range(151_643))
    assert merges[0] == "#version: 0.2" and merges[-1] == ""
    assert len(merges) - 2 == 151_387
    assert merges[1:5] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t"]
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "151643": "<|endoftext|>", "151644": "<|im_start|>", "151645": "<|im_end|>"}
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert special_ids(vocab) == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def test_known_ids(qwen_fast):
    assert qwen_fast("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert qwen_fast("你好").input_ids == [108386]
    assert qwen_fast("Qwen").input_ids == [48, 16948]
    assert len(qwen_fast) == 151_646
    assert (qwen_fast.pad_token_id, qwen_fast.eos_token_id) == (151643, 151643)
    assert qwen_fast.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert qwen_fast.bos_token_id is None


@pytest.fixture(scope="session")
def qwen_pipeline(qwen_dir):
    return bpe_pipeline(qwen_dir / "vocab.json", qwen_dir / "merges.txt")[0]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_ids_equal_the_slow_reference(qwen_fast, qwen_slow, qwen_pipeline, text):
    pipeline = qwen_pipeline
    expected = qwen_slow(text).input_ids
    assert qwen_fast(text).input_ids == expected
    assert pipeline.encode(text, add_special_tokens=False).ids == expected
    assert qwen_fast.decode(expected) == qwen_slow.decode(expected)


def test_byte_map_round_trips():
    chars = byte_to_char()
    assert len(set(chars)) == 256 and chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ" and chars[10] == "Ċ"
    data = bytes(range(256))
    assert token_bytes(token_text(data)) == data


def test_merges_from_ranks_on_a_small_vocabulary():
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"bc", b"abcbc"]
    merges = merges_from_ranks(tokens)
    assert merges == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"abc", b"bc")]


def test_unreachable_token_is_an_error():
    tokens = [bytes([b]) for b in range(256)] + [b"abc"]
    with pytest.raises(UserError, match="rank 256"):
        merges_from_ranks(tokens)


def test_bad_tiktoken_line_is_named(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(base64.b64encode(b"a") + b" 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match="line 2"):
        read_tiktoken(path)


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="lacks vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        bpe_pipeline(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_command_rebuilds_identical_bytes(qwen_dir, tmp_path, capsys):
    from qwenbuild.cli import main

    assert main(["tokenizer", "--output_dir", str(tmp_path / "tok")]) == 0
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [".qwenbuild-seal.json", "merges.txt",
                                                                   "tokenizer_config.json", "vocab.json"]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (qwen_dir / name).read_bytes()
    assert "151,387 merges" in capsys.readouterr().err
