"""Cosine learning rate with linear warm-up, step by step as MindFormers' CosineWithWarmUpLR computes it."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(total_steps * warmup_ratio)


def cosine_with_warmup(step: int, total_steps: int, learning_rate: float, warmup_ratio: float,
                       lr_end: float = 0.0) -> float:
    """Learning rate used by optimizer step `step` (0-based): 0 -> lr linearly, then half a cosine down to lr_end."""
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step >= total_steps:
        return lr_end
    if warmup and step < warmup:
        return learning_rate * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr_end + (learning_rate - lr_end) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedule(total_steps: int, learning_rate: float, warmup_ratio: float, lr_end: float = 0.0) -> list[float]:
    return [cosine_with_warmup(s, total_steps, learning_rate, warmup_ratio, lr_end) for s in range(total_steps)]
