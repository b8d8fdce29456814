"""LoRA adapters out of checkpoints: merged into the frozen weights (W + alpha / rank * B A, streamed tensor by
tensor), or written as a PEFT adapter (adapter_config.json + adapter_model.safetensors) for Hugging Face models."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from qwenbuild import dtypes
from qwenbuild.errors import UserError
from qwenbuild.model import lora as names
from qwenbuild.model.lora import LoraConfig
from qwenbuild.model.params import CONFIG_ENTRY, LORA_ENTRY
from qwenbuild.store import atomic_path
from qwenbuild.weights.mindspore_ckpt import CkptTensor, read_array, read_tensors, read_text, write_checkpoint
from qwenbuild.weights.safetensors_file import TensorToWrite, write

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


logger = logging.getLogger(__name__)


def read_adapters(path: str | Path, lora: LoraConfig, cfg) -> dict[str, np.ndarray]:
    """The complete adapters of a checkpoint (float32), every one `lora` trains present with its whole shape; a
    LORA_ENTRY the file records must agree with `lora`, so an adapter is never scaled as another run's."""
    tensors = {t.name: t for t in read_tensors(path)}
    if LORA_ENTRY in tensors:
        recorded = json.loads(read_text(tensors[LORA_ENTRY]))
        if LoraConfig(**recorded) != lora:
            raise UserError(f"{path} holds adapters trained with {recorded}, not with the settings given "
                            f"({dataclasses.asdict(lora)})", hint="train again (doit finetune) with these settings")
    expected = names.adapter_shapes(cfg, lora)
    missing = [n for n in expected if n not in tensors]
    wrong = [f"{n} {tuple(tensors[n].shape)} (expected {expected[n]})" for n in expected
             if n in tensors and tuple(tensors[n].shape) != expected[n]]
    if missing or wrong:
        raise UserError(f"{path} does not hold the adapters of rank {lora.rank} on {', '.join(lora.targets)}: "
                        + "; ".join(([f"missing {', '.join(missing[:4])}"] if missing else []) + wrong[:4]),
                        hint="merge the checkpoints of a LoRA run with these settings")
    return {n: read_array(tensors[n]).astype(np.float32) for n in expected}


@dataclasses.dataclass(frozen=True)
class _Copied:
    """A base tensor written as it is, byte for byte."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    base: CkptTensor

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def chunks(self):
        return self.base.chunks()


@dataclasses.dataclass(frozen=True)
class _Merged(_Copied):
    """One weight of the base with its adapters' product added, in the base's own dtype (so its size)."""

    b: np.ndarray
    a: np.ndarray
    scale: float

    def chunks(self):
        merged = read_array(self.base).astype(np.float32) + np.float32(self.scale) * (self.b @ self.a)
        yield dtypes.cast_bytes(np.ascontiguousarray(merged, np.float32).tobytes(), "float32", self.dtype)


def merge_lora(base_ckpt: str | Path, adapters: dict[str, np.ndarray], lora: LoraConfig, out_path: str | Path,
               progress: Callable[[str], None] | None = logger.info) -> dict:
    """The base checkpoint with W + (alpha / rank) * B @ A for every adapted weight (in float32, then the weight's
    own dtype) and every other tensor's bytes as they are; the adapters' settings and scale are recorded in it
    (LORA_ENTRY). One weight is held at a time."""
    started = time.monotonic()
    say = progress or (lambda _m: None)
    tensors, texts, changed = [], {}, []
    for t in read_tensors(base_ckpt):
        if t.type_name == "str":
            texts[t.name] = read_text(t)
            continue
        dtype = dtypes.from_mindspore(t.type_name, f"{base_ckpt}: {t.name}")
        cell = names.cell_of(t.name)
        if t.name.endswith(".weight") and f"{cell}.{names.A}" in adapters:
            tensors.append(_Merged(t.name, t.shape, dtype, t, adapters[f"{cell}.{names.B}"],
                                   adapters[f"{cell}.{names.A}"], lora.scale))
            changed.append(t.name)
        else:
            tensors.append(_Copied(t.name, t.shape, dtype, t))
    absent = sorted({names.weight_of(n) for n in adapters} - set(changed))
    if absent:
        raise UserError(f"{base_ckpt} lacks {', '.join(absent[:4])}, which the adapters add to",
                        hint="merge onto the checkpoint the run started from (the converted weights)")
    if CONFIG_ENTRY not in texts:
        raise UserError(f"{base_ckpt} has no {CONFIG_ENTRY} entry", hint="use a checkpoint qwenbuild converted")
    texts[LORA_ENTRY] = json.dumps({**dataclasses.asdict(lora), "scale": lora.scale}, sort_keys=True)
    with atomic_path(out_path) as tmp:
        size = write_checkpoint(tmp, tensors, texts=texts)
    say(f"merged the adapters into {len(changed)} weight(s), scale alpha / rank = {lora.alpha:g} / {lora.rank} = "
        f"{lora.scale:g} ({size / 1e6:.1f} MB written in {time.monotonic() - started:.1f} s)")
    return {"changed": changed, "scale": lora.scale, "bytes": size}


def peft_config(lora: LoraConfig, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_peft_adapter(adapters: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                       out_dir: str | Path) -> list[Path]:
    """adapter_config.json and adapter_model.safetensors (keys base_model.model.model.layers.N.self_attn.q_proj.
    lora_A.weight [rank, in] and lora_B.weight [out, rank], float32) in `out_dir`, which must exist."""
    out_dir = Path(out_dir)
    tensors = [TensorToWrite(names.peft_key(n), tuple(v.shape), "float32",
                             lambda v=v: [np.ascontiguousarray(v, "<f4").tobytes()]) for n, v in adapters.items()]
    write(out_dir / PEFT_WEIGHTS, sorted(tensors, key=lambda t: t.name), metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(peft_config(lora, base_model), indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return [out_dir / PEFT_CONFIG, out_dir / PEFT_WEIGHTS]
