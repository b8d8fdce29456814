"""The real Qwen1.5 tokenizer files (vocab.json, merges.txt), rebuilt offline from the vendored qwen.tiktoken ranks."""

from __future__ import annotations

import base64
import logging
import os
import time
from importlib import resources
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.jsonfile import refuse_device
from qwenbuild.tokenizer.byte_level import token_text
from qwenbuild.tokenizer.files import write_tokenizer_files

logger = logging.getLogger(__name__)

QWEN_MERGES = 151_387


def vendored_tiktoken() -> Path:
    return Path(str(resources.files("qwenbuild") / "resources" / "qwen.tiktoken"))


def read_tiktoken(path: str | os.PathLike) -> list[bytes]:
    """Token bytes by rank from a tiktoken ranks file ("base64 rank" per line, ranks 0..n-1)."""
    path = Path(path)
    by_rank: dict[int, bytes] = {}
    rank_line: dict[int, int] = {}
    token_line: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            refuse_device(f, path, "tiktoken ranks file")
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    encoded, rank_text = line.split()
                    rank, token = int(rank_text), base64.b64decode(encoded, validate=True)
                except ValueError as exc:
                    raise UserError(f"{path} line {lineno}: expected 'BASE64 RANK', found {line[:60]!r} ({exc})")
                if rank in rank_line:
                    raise UserError(f"{path} line {lineno}: rank {rank} was given already on line {rank_line[rank]}",
                                    hint="each rank names one token")
                if token in token_line:
                    raise UserError(f"{path} line {lineno}: token {token!r} was ranked already on line "
                                    f"{token_line[token]}", hint="each token has one rank")
                by_rank[rank], rank_line[rank], token_line[token] = token, lineno, lineno
    except OSError as exc:
        raise UserError(f"cannot read the tiktoken ranks file {path}: {exc.strerror}")
    if not by_rank:
        raise UserError(f"{path} holds no tokens", hint="pass a tiktoken ranks file ('BASE64 RANK' per line)")
    if sorted(by_rank) != list(range(len(by_rank))):
        raise UserError(f"{path}: ranks are not 0..{len(by_rank) - 1} without gaps")
    return [by_rank[r] for r in range(len(by_rank))]


def _split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE over the token's bytes with only merges of lower rank; the two parts left form its own merge."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_i, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise UserError(f"token of rank {rank} ({token!r}) cannot be reached by merging lower-ranked tokens",
                        hint="the ranks file is not a byte-level BPE vocabulary")
    return parts[0], parts[1]


def merges_from_ranks(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that makes byte-level BPE produce exactly these ranked tokens."""
    ranks = {tok: r for r, tok in enumerate(tokens)}
    return [_split_in_two(tok, r, ranks) for r, tok in enumerate(tokens) if len(tok) > 1]


def build_qwen_tokenizer(output_dir: str | os.PathLike, tiktoken_file: str | os.PathLike | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the Qwen1.5 tokenizer into output_dir."""
    start = time.perf_counter()
    tokens = read_tiktoken(tiktoken_file or vendored_tiktoken())
    merges = merges_from_ranks(tokens)
    vocab = [token_text(t) for t in tokens]
    out = write_tokenizer_files(output_dir, vocab, [(token_text(a), token_text(b)) for a, b in merges])
    logger.info(f"tokenizer: {len(vocab):,} tokens + 3 special, {len(merges):,} merges -> {out} "
                f"in {time.perf_counter() - start:.1f} s")
    return out
