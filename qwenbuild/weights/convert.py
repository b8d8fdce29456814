"""Hugging Face Qwen1.5 checkpoint -> one MindSpore .ckpt with MindFormers names, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qwenbuild import dtypes
from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import CONFIG_ENTRY, check_names, hf_to_ms, ms_to_hf, parameter_shapes
from qwenbuild.store import atomic_path
from qwenbuild.weights import hf_source, mindspore_ckpt

logger = logging.getLogger(__name__)

# buffers some HF checkpoints carry that are recomputed, not learned
_RECOMPUTED = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class OutputTensor:
    name: str  # MindFormers name
    shape: tuple[int, ...]
    dtype: str  # output dtype
    source: hf_source.SourceTensor

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def chunks(self):
        for chunk in self.source.chunks():
            yield dtypes.cast_bytes(chunk, self.source.dtype, self.dtype)


def _tied_copy(torch_ckpt_dir, lm_head: hf_source.SourceTensor, embedding: hf_source.SourceTensor | None) -> None:
    """A tied model's lm_head.weight may be stored only as a copy of the embedding table; anything else would be
    lost by tying, so it is refused."""
    same = embedding is not None and (lm_head.shape, lm_head.dtype) == (embedding.shape, embedding.dtype) and \
        _digest(lm_head) == _digest(embedding)
    if not same:
        raise UserError(f"{Path(torch_ckpt_dir) / 'config.json'}: tie_word_embeddings is true, but the checkpoint "
                        "holds an lm_head.weight that differs from model.embed_tokens.weight; tying would drop it",
                        hint="set tie_word_embeddings to false in config.json if the model has its own output "
                             "projection")


def _digest(tensor: hf_source.SourceTensor) -> str:
    h = hashlib.sha256()
    for chunk in tensor.chunks():
        h.update(chunk)
    return h.hexdigest()


def conversion_tensors(torch_ckpt_dir, dtype: str | None = None) -> tuple[QwenConfig, list, list[str]]:
    """Check every tensor of the HF directory against its config.json; the MindSpore tensors to write, in network
    order, and notes about dropped entries. Raises UserError listing every mismatch."""
    cfg = QwenConfig.from_hf_dir(torch_ckpt_dir)
    files, sources = hf_source.source_tensors(torch_ckpt_dir)
    notes, kept = [], {}
    for hf_name, src in sources.items():
        if hf_name.endswith(_RECOMPUTED):
            notes.append(f"dropped {hf_name} (recomputed buffer)")
        elif hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            _tied_copy(torch_ckpt_dir, src, sources.get("model.embed_tokens.weight"))
            notes.append("dropped lm_head.weight: config.json ties it to the embedding table (and it equals it)")
        else:
            kept[hf_name] = src
    expected = {ms_to_hf(n): shape for n, shape in parameter_shapes(cfg).items()}
    where = f"{Path(torch_ckpt_dir)} ({', '.join(f.name for f in files)})"
    check_names(expected, {n: s.shape for n, s in kept.items()}, where)
    tensors = [OutputTensor(hf_to_ms(n), shape, dtype or kept[n].dtype, kept[n]) for n, shape in expected.items()]
    return cfg, tensors, notes


def convert_weight(torch_ckpt_dir, mindspore_ckpt_path, dtype: str | None = None,
                   progress: Callable[[str], None] | None = logger.info) -> dict:
    """Convert a Hugging Face Qwen1.5 directory to one MindSpore checkpoint; returns a summary dict.

    `dtype` is None (keep each tensor's dtype), "bf16"/"bfloat16", "fp16"/"float16" or "fp32"/"float32".
    Memory stays at one chunk of one tensor whatever the model size. Nothing is written when any check fails.
    """
    started = time.monotonic()
    out_dtype = dtypes.from_user(dtype)
    cfg, tensors, notes = conversion_tensors(torch_ckpt_dir, out_dtype)
    say = progress or (lambda _m: None)
    for note in notes:
        say(note)
    total = len(tensors)
    done = [0]

    def step(t: OutputTensor):
        done[0] += 1
        say(f"[{done[0]}/{total}] {t.source.name} -> {t.name} {list(t.shape)} {t.source.dtype} -> {t.dtype}")

    out = Path(mindspore_ckpt_path)
    out_dtypes = sorted({t.dtype for t in tensors})
    stored = dataclasses.replace(cfg, param_dtype=out_dtypes[0] if len(out_dtypes) == 1 else cfg.param_dtype)
    config_text = json.dumps(stored.to_hf_dict(), sort_keys=True)
    with atomic_path(out, inputs=[torch_ckpt_dir]) as tmp:
        size = mindspore_ckpt.write_checkpoint(tmp, tensors, step, texts={CONFIG_ENTRY: config_text})
    numel = sum(t.nbytes // ITEMSIZE[t.dtype] for t in tensors)
    seconds = time.monotonic() - started
    say(f"converted {total} tensors ({numel / 1e6:.1f}M parameters, {'/'.join(out_dtypes)}) from {torch_ckpt_dir} "
        f"to {out} ({size / 1e6:.1f} MB) in {seconds:.1f} s")
    return {"tensors": total, "parameters": numel, "bytes": size, "seconds": seconds, "dtypes": out_dtypes,
            "config": cfg}
