"""Write a Hugging Face Qwen1.5 model directory: safetensors shards (with an index when more than one) + config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from qwenbuild.dtypes import DTYPES
from qwenbuild.model.config import QwenConfig
from qwenbuild.weights import safetensors_file
from qwenbuild.weights.safetensors_file import TensorToWrite

# the shard size transformers' save_pretrained uses by default
MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_METADATA = {"format": "pt"}


def shard(tensors: list[TensorToWrite], max_shard_bytes: int) -> list[list[TensorToWrite]]:
    """Consecutive groups of at most max_shard_bytes (a bigger single tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_config(directory: Path, cfg: QwenConfig) -> None:
    text = json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n"
    (directory / "config.json").write_text(text, encoding="utf-8")


def write_model_dir(directory: Path, cfg: QwenConfig, tensors: list[TensorToWrite],
                    max_shard_bytes: int = MAX_SHARD_BYTES, progress: Callable | None = None) -> list[str]:
    """Write tensors and config.json into an existing (temporary) directory; returns the file names written."""
    groups = shard(tensors, max_shard_bytes)
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for name, group in zip(names, groups):
        safetensors_file.write(directory / name, group, SAFETENSORS_METADATA, progress)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, group in zip(names, groups) for t in group}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append("model.safetensors.index.json")
    write_config(directory, cfg)
    return names + ["config.json"]


def write_torch_bin(path: Path, tensors: list[TensorToWrite], progress: Callable | None = None) -> None:
    """One torch state dict (HF names) as pytorch_model.bin, the original convert_reversed.py's output; unlike the
    safetensors directory it holds the whole model in memory while saving."""
    # torch takes seconds to load: imported only for this output
    import torch

    kinds = {name: getattr(torch, name) for name in DTYPES}
    state = {}
    for t in tensors:
        data = bytearray(b"".join(t.chunks()))
        state[t.name] = torch.frombuffer(data, dtype=kinds[t.dtype]).reshape(t.shape) if data else \
            torch.empty(t.shape, dtype=kinds[t.dtype])
        if progress:
            progress(t)
    torch.save(state, path)
