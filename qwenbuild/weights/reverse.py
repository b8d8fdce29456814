"""MindSpore checkpoint (MindFormers names) -> Hugging Face Qwen1.5 model directory, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

from qwenbuild import dtypes
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import BadJSON, parse_json, read_json
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import (CONFIG_ENTRY, EMBEDDING, check_names, is_beside_weights, ms_to_hf,
                                      parameter_shapes, split_layer_name)
from qwenbuild.store import atomic_path
from qwenbuild.weights import hf_output, mindspore_ckpt
from qwenbuild.weights.safetensors_file import TensorToWrite

logger = logging.getLogger(__name__)

# hidden_size -> (num_heads, rope_theta) of the published Qwen1.5 sizes: head count is not visible in tensor shapes
QWEN1_5_SIZES = {1024: (16, 1e6), 2048: (16, 1e6), 2560: (20, 5e6), 4096: (32, 1e6), 5120: (40, 1e6),
                 8192: (64, 1e6)}


def infer_config(shapes: dict[str, tuple[int, ...]], where) -> QwenConfig:
    """Dimensions read from tensor shapes; head count and rope_theta from the published Qwen1.5 size of hidden."""
    try:
        vocab, hidden = shapes[EMBEDDING]
        q_out = shapes["model.layers.0.attention.wq.weight"][0]
        kv_out = shapes["model.layers.0.attention.wk.weight"][0]
        intermediate = shapes["model.layers.0.feed_forward.w1.weight"][0]
    except (KeyError, ValueError):
        raise UserError(f"{where} lacks the embedding or layer-0 tensors needed to infer the model dimensions",
                        hint="pass --config with the model's config.json")
    if hidden not in QWEN1_5_SIZES or q_out != hidden:
        raise UserError(f"{where}: hidden size {hidden} is not a published Qwen1.5 size, so the number of attention "
                        "heads cannot be read from the tensor shapes",
                        hint="pass --config with the model's config.json")
    heads, theta = QWEN1_5_SIZES[hidden]
    head_dim = hidden // heads
    layers = 1 + max(layer[0] for n in shapes if (layer := split_layer_name(n)))
    return QwenConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      n_kv_heads=kv_out // head_dim, intermediate_size=intermediate, rope_theta=theta,
                      qkv_has_bias="model.layers.0.attention.wq.bias" in shapes,
                      tie_word_embeddings="lm_head.weight" not in shapes)


def _as_config(config) -> QwenConfig | None:
    if config is None or isinstance(config, QwenConfig):
        return config
    path = Path(config)
    return QwenConfig.from_hf_dir(path) if path.is_dir() else _config_file(path)


def _config_file(path: Path) -> QwenConfig:
    return QwenConfig.from_hf_dict(read_json(path, "config", hint="a Hugging Face Qwen1.5 config.json"))


def convert_reversed(mindspore_ckpt_path, torch_ckpt_path, config: QwenConfig | str | Path | None = None,
                     max_shard_bytes: int = hf_output.MAX_SHARD_BYTES,
                     progress: Callable[[str], None] | None = logger.info) -> dict:
    """Write a Hugging Face model directory from a MindSpore checkpoint; optimizer state is dropped.

    `config` is a QwenConfig, a config.json path or a directory holding one; None infers it from tensor shapes.
    Tensors keep their dtype; the directory appears complete or not at all.
    """
    started = time.monotonic()
    say = progress or (lambda _m: None)
    src = Path(mindspore_ckpt_path)
    if not src.is_file():
        raise UserError(f"checkpoint {src} does not exist")
    all_tensors = mindspore_ckpt.read_tensors(src)
    weights = {t.name: t for t in all_tensors if not is_beside_weights(t.name)}
    stored = next((t for t in all_tensors if t.name == CONFIG_ENTRY), None)
    dropped = len(all_tensors) - len(weights) - (stored is not None)
    cfg = _as_config(config)
    if cfg is None and stored is not None:
        try:
            cfg = QwenConfig.from_hf_dict(parse_json(mindspore_ckpt.read_text(stored)))
        except (BadJSON, UserError) as exc:
            raise UserError(f"{src}: its stored {CONFIG_ENTRY} entry is not a usable config.json: {exc}",
                            hint="pass --config with the model's config.json") from None
        say(f"config from the checkpoint's own {CONFIG_ENTRY} entry: {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads} heads ({cfg.n_kv_heads} kv)")
    if cfg is None:
        cfg = infer_config({n: t.shape for n, t in weights.items()}, src)
        say(f"config inferred from tensor shapes: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads ({cfg.n_kv_heads} kv), rope_theta {cfg.rope_theta:g}, rms_norm_eps "
            f"{cfg.rms_norm_eps:g}; pass --config to set them exactly")
    check_names(parameter_shapes(cfg), {n: t.shape for n, t in weights.items()}, src)
    out_tensors = [TensorToWrite(ms_to_hf(n), weights[n].shape, dtypes.from_mindspore(weights[n].type_name, n),
                                 weights[n].chunks) for n in parameter_shapes(cfg)]
    kinds = sorted({t.dtype for t in out_tensors})
    cfg = dataclasses.replace(cfg, param_dtype=kinds[0] if len(kinds) == 1 else "float32")
    total, done = len(out_tensors), [0]

    def step(t: TensorToWrite):
        done[0] += 1
        say(f"[{done[0]}/{total}] {t.name} {list(t.shape)} {t.dtype}")

    out = Path(torch_ckpt_path)
    inputs = [src] + ([config] if isinstance(config, (str, Path)) else [])
    if out.suffix == ".bin":
        # the original convert_reversed.py writes one torch state dict with HF names
        with atomic_path(out, inputs=inputs) as tmp:
            hf_output.write_torch_bin(tmp, out_tensors, step)
        files = [out.name]
    else:
        with atomic_path(out, directory=True, inputs=inputs) as tmp:
            files = hf_output.write_model_dir(tmp, cfg, out_tensors, max_shard_bytes, step)
    size = sum(t.nbytes for t in out_tensors)
    seconds = time.monotonic() - started
    say(f"wrote {total} tensors ({size / 1e6:.1f} MB, {'/'.join(kinds)}) to {out} in "
        f"{sum(f.endswith(('.safetensors', '.bin')) for f in files)} weight file(s), "
        f"dropped {dropped} optimizer/step entries, in {seconds:.1f} s")
    return {"tensors": total, "dropped": dropped, "files": files, "bytes": size, "seconds": seconds, "config": cfg}
