"""Loading tokenizer files (transformers' Qwen2TokenizerFast for users, a bare `tokenizers` pipeline for preprocess)
and the special ids a loaded tokenizer stops and pads with."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.tokenizer.files import (CONFIG_FILE, ENDOFTEXT, IM_END, MERGES_FILE, PRETOKENIZE_PATTERN,
                                       SPECIAL_TOKENS, VOCAB_FILE, check_merges_fit, pad_token_id, read_merges, read_vocab,
                                       special_ids, tokenizer_config)


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """transformers.Qwen2TokenizerFast for a directory holding vocab.json, merges.txt and tokenizer_config.json."""
    # transformers takes seconds to load: imported only when a tokenizer is loaded
    from transformers import Qwen2TokenizerFast

    tokenizer_dir = Path(tokenizer_dir)
    missing = [name for name in (VOCAB_FILE, MERGES_FILE, CONFIG_FILE) if not (tokenizer_dir / name).is_file()]
    if missing:
        raise UserError(f"tokenizer directory {tokenizer_dir} lacks {', '.join(missing)}",
                        hint="build it with `qwenbuild tokenizer --output_dir DIR`")
    return Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir))


def load_tokenizer_files(vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
    """Qwen2TokenizerFast from a vocab.json and a merges.txt alone (the original scripts' --vocab_file and
    --merge_file); the special tokens follow the vocabulary as in every Qwen tokenizer."""
    for flag, path in (("--vocab_file", vocab_file), ("--merge_file", merges_file)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist", hint="pass the vocab.json and merges.txt of the model")
    vocab = read_vocab(vocab_file)
    check_merges_fit(vocab, read_merges(merges_file), vocab_file, merges_file)
    num_regular = len({tok for tok in vocab if tok not in SPECIAL_TOKENS})
    with tempfile.TemporaryDirectory(prefix="qwenbuild-tokenizer-") as work:
        (Path(work) / VOCAB_FILE).symlink_to(Path(vocab_file).resolve())
        (Path(work) / MERGES_FILE).symlink_to(Path(merges_file).resolve())
        (Path(work) / CONFIG_FILE).write_text(json.dumps(tokenizer_config(num_regular)), encoding="utf-8")
        return load_tokenizer(work)


def with_qwen_text_rules(tokenizer):
    """NFC, then Qwen's split regex, then the byte-level alphabet: what every Qwen tokenizer does before BPE."""
    # tokenizers loads slowly: imported only when a tokenizer is built
    from tokenizers import Regex, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tokenizer


def bpe_pipeline(vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
    """A `tokenizers.Tokenizer` equal to Qwen2Tokenizer on these files: NFC, Qwen regex, byte-level BPE, specials."""
    # tokenizers loads slowly: imported only when a tokenizer is built
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = read_vocab(vocab_file)
    merges = read_merges(merges_file)
    check_merges_fit(vocab, merges, vocab_file, merges_file)
    specials = special_ids(vocab)
    regular = {tok: i for tok, i in vocab.items() if tok not in specials}
    try:
        bpe = models.BPE(vocab=regular, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the Rust side reports merges naming tokens absent from the vocab
        raise UserError(f"{merges_file} does not match {vocab_file}: {exc}",
                        hint="use the vocab.json and merges.txt of the same tokenizer")
    tokenizer = with_qwen_text_rules(Tokenizer(bpe))
    tokenizer.decoder = decoders.ByteLevel()
    for tok in sorted(specials, key=specials.get):
        tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
        if tokenizer.token_to_id(tok) != specials[tok]:
            raise UserError(f"{vocab_file}: {tok} would get id {tokenizer.token_to_id(tok)}, expected "
                            f"{specials[tok]}", hint="special tokens must follow the regular tokens without gaps")
    return tokenizer, specials


def stop_ids(tokenizer) -> list[int]:
    """Ids of <|im_end|> (end of a chat reply) and <|endoftext|> (end of a document), as this tokenizer has them."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in (IM_END, ENDOFTEXT) if tok not in vocab]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token",
                        hint="use a Qwen1.5 tokenizer directory (vocab.json, merges.txt, tokenizer_config.json)")
    return [vocab[IM_END], vocab[ENDOFTEXT]]


def pad_id(tokenizer) -> int:
    return pad_token_id(tokenizer.get_vocab())
