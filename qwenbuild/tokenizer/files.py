"""The on-disk tokenizer format shared by the real Qwen tokenizer and the project's small trained one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_bytes, read_json
from qwenbuild.store import atomic_path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# appended right after the regular tokens, in this order (Qwen2Tokenizer's convention)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# the real Qwen1.5 vocabulary: 151,643 byte-level BPE tokens, then the special tokens 151643..151645
QWEN_REGULAR_TOKENS = 151_643
QWEN_SPECIAL_IDS = {tok: QWEN_REGULAR_TOKENS + i for i, tok in enumerate(SPECIAL_TOKENS)}
QWEN_VOCAB_SIZE = QWEN_REGULAR_TOKENS + len(SPECIAL_TOKENS)

# the pre-tokenizer of Qwen2Tokenizer: contractions, letter runs, single digits, punctuation, newlines, spaces
PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# plain ChatML with no injected system turn, as MindFormers' Qwen1.5 preprocessing renders conversations
CHATML_TEMPLATE = ("{% for message in messages %}"
                   "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                   "{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MODEL_MAX_LENGTH = 32768
VOCAB_FILE, MERGES_FILE, CONFIG_FILE = "vocab.json", "merges.txt", "tokenizer_config.json"


def tokenizer_config(num_regular: int) -> dict:
    """tokenizer_config.json declaring the three special tokens right after `num_regular` regular tokens."""
    added = {str(num_regular + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}
             for i, tok in enumerate(SPECIAL_TOKENS)}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(output_dir: str | os.PathLike, vocab: list[str], merges: list[tuple[str, str]]) -> Path:
    """Write vocab.json (token -> id, ids in list order), merges.txt and tokenizer_config.json as one directory."""
    output_dir = Path(output_dir)
    with atomic_path(output_dir, directory=True) as tmp:
        vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False, separators=(",", ":"))
        (tmp / VOCAB_FILE).write_text(vocab_json, encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (tmp / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = json.dumps(tokenizer_config(len(vocab)), ensure_ascii=False, indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(config + "\n", encoding="utf-8")
    return output_dir


def read_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    path = Path(vocab_file)
    vocab = read_json(path, "vocab file", hint="expected a token -> id JSON object",
                      missing_hint="build one with `qwenbuild tokenizer --output_dir DIR` or point at a model's "
                                   "vocab.json")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise UserError(f"{path} is not a token -> id JSON object", hint="expected e.g. {\"!\": 0, ...}")
    holder: dict[int, str] = {}
    for tok, i in vocab.items():
        if i < 0:
            raise UserError(f"{path}: token {tok!r} has the negative id {i}", hint="ids count up from 0")
        if i in holder:
            raise UserError(f"{path}: tokens {holder[i]!r} and {tok!r} both have id {i}",
                            hint="every token needs its own id")
        holder[i] = tok
    return vocab


def check_merges_fit(vocab: dict[str, int], merges: list, vocab_file, merges_file) -> None:
    """A vocabulary beyond the 256 byte tokens with no merges cuts every text into single bytes: refused by name,
    not found later as rows too long for seq_length."""
    regular = sum(1 for tok in vocab if tok not in SPECIAL_TOKENS)
    if not merges and regular > 256:
        raise UserError(f"{merges_file} holds no merges, but {vocab_file} has {regular:,} tokens beyond the special "
                        "ones: every text would be cut into single bytes",
                        hint="use the merges.txt of the same tokenizer (it starts with '#version' and lists one "
                             "merge per line)")


def special_ids(vocab: dict[str, int]) -> dict[str, int]:
    """Ids of <|endoftext|>, <|im_start|>, <|im_end|>: from the vocab if listed there, else appended after it."""
    ids, next_id = {}, max(vocab.values(), default=-1) + 1
    for tok in SPECIAL_TOKENS:
        if tok in vocab:
            ids[tok] = vocab[tok]
        else:
            ids[tok], next_id = next_id, next_id + 1
    return ids


def pad_token_id(vocab: dict[str, int]) -> int:
    """The id rows are padded with: <|endoftext|>, Qwen1.5's pad and eos token."""
    return special_ids(vocab)[ENDOFTEXT]


def read_merges(merges_file: str | os.PathLike) -> list[tuple[str, str]]:
    """Merges in rank order; empty lines and '#' lines (the version header) are skipped like Qwen2Tokenizer does."""
    path = Path(merges_file)
    try:
        text = read_bytes(path, "merges file").decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"merges file {path} does not exist",
                        hint="build one with `qwenbuild tokenizer --output_dir DIR` or point at a model's merges.txt")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: {exc}")
    merges = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line or line.startswith("#"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"{path} line {lineno}: expected two tokens separated by one space, found {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
