"""Choosing the next token from logits, in the order of the original generator: repetition penalty, then
(sampling only) temperature, top_k, top_p, and a numpy multinomial draw."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwenbuild.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    top_k: int = 3
    top_p: float = 0.85
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 turns it off), not {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p must lie in (0, 1] (1 turns it off), not {self.top_p}")
        # nan compares false with every bound and inf turns the logits into nan: both refused by name
        if not math.isfinite(self.temperature) or self.temperature <= 0.0:
            raise UserError(f"--temperature must be a finite number > 0, not {self.temperature}",
                            hint="for deterministic output leave out --do_sample instead")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise UserError(f"--repetition_penalty must be a finite number > 0 (1 turns it off), not "
                            f"{self.repetition_penalty}")


def repetition_penalty(logits: np.ndarray, seen_ids, penalty: float) -> np.ndarray:
    """Make every token already in the row less likely: positive logits are divided, negative multiplied."""
    if penalty == 1.0 or not len(seen_ids):
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    picked = out[ids]
    out[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -k)[-k]
    return np.where(logits < threshold, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens whose probabilities add up to p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")
    probs = softmax(logits[order])
    drop = np.cumsum(probs) <= 1.0 - p
    drop[-1] = False
    out = logits.copy()
    out[order[drop]] = -np.inf
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = np.exp(x - np.max(x))
    return x / x.sum()


class TokenChooser:
    """Picks one token per row; holds the seeded random generator so a run is reproducible."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def choose(self, logits: np.ndarray, seen_ids) -> int:
        s = self.sampling
        logits = repetition_penalty(np.asarray(logits, dtype=np.float32), seen_ids, s.repetition_penalty)
        if not s.do_sample:
            return int(np.argmax(logits))
        if s.temperature != 1.0:
            logits = logits / np.float32(s.temperature)
        logits = top_p_filter(top_k_filter(logits, s.top_k), s.top_p)
        probs = softmax(logits)
        return int(self.rng.choice(probs.shape[0], p=probs))
