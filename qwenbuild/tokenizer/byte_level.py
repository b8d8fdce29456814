"""The GPT-2 byte-level alphabet that Qwen's vocab.json and merges.txt are written in."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def byte_to_char() -> tuple[str, ...]:
    """Printable Latin-1 bytes stand for themselves; the other 68 bytes take code points 256, 257, ... in order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 256
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(extra))
            extra += 1
    return tuple(chars)


@functools.lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_char())}


def token_text(token: bytes) -> str:
    """How a token's bytes are spelled in vocab.json and merges.txt."""
    table = byte_to_char()
    return "".join(table[b] for b in token)


def token_bytes(text: str) -> bytes:
    table = char_to_byte()
    return bytes(table[c] for c in text)
