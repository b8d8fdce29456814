"""Published Qwen1.5 configs (bench/published_configs.json) that the benchmarks build their models from."""

from __future__ import annotations

import json
from pathlib import Path

PUBLISHED = Path(__file__).with_name("published_configs.json")
NAMES = ("qwen1.5-0.5b", "qwen1.5-1.8b")


def hf_config(name: str) -> dict:
    """config.json of `name` as published (tie_word_embeddings included: 0.5B tied, 1.8B not)."""
    return json.loads(PUBLISHED.read_text())[name]


def qwen_config(name: str, **overrides):
    """QwenConfig of `name`; overrides such as param_dtype="float32" (published: bfloat16)."""
    from qwenbuild.model.config import QwenConfig

    return QwenConfig.from_hf_dict(hf_config(name), **overrides)
