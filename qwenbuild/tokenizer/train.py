"""A small byte-level BPE tokenizer in the Qwen format, trained on the project's own text for tiny models."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from qwenbuild.errors import UserError
from qwenbuild.tokenizer.files import QWEN_VOCAB_SIZE, SPECIAL_TOKENS, write_tokenizer_files
from qwenbuild.tokenizer.load import with_qwen_text_rules

logger = logging.getLogger(__name__)

_BYTES = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike) -> Path:
    """Train byte-level BPE with Qwen's normaliser and pre-tokenizer; vocab_size counts the 3 special tokens.

    texts: the training text, e.g. the ChatML of every conversation (`qwenbuild.data.corpus.corpus_texts`).
    """
    # tokenizers loads slowly: imported only when a tokenizer is built
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    regular = vocab_size - len(SPECIAL_TOKENS)
    if vocab_size > QWEN_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size:,} is larger than the real Qwen1.5 vocabulary ({QWEN_VOCAB_SIZE:,})",
                        hint="a trained tokenizer is meant to be small, e.g. vocab_size 512")
    if regular < _BYTES:
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs {_BYTES} byte tokens "
                        f"+ {len(SPECIAL_TOKENS)} special tokens", hint=f"use vocab_size >= {_BYTES + 3}")
    start = time.perf_counter()
    tokenizer = with_qwen_text_rules(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=regular, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    if len(vocab) != regular:
        raise UserError(f"the training text supports only {len(vocab) + len(SPECIAL_TOKENS)} tokens "
                        f"(pairs seen at least twice), not vocab_size {vocab_size}",
                        hint=f"use vocab_size <= {len(vocab) + len(SPECIAL_TOKENS)} or train on more text")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    out = write_tokenizer_files(output_dir, vocab, merges)
    logger.info(f"tokenizer: trained {len(vocab)} tokens + 3 special, {len(merges)} merges -> {out} "
                f"in {time.perf_counter() - start:.1f} s")
    return out
