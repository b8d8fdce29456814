"""Tasks of the weights: random starting checkpoint (no hf_dir) and HF -> MindSpore conversion."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.manifest._presets import DIMENSION_KEYS
from qwenbuild.tasks._spec import Context, TaskSpec

MODEL_KEYS = tuple(f"model.{k}" for k in DIMENSION_KEYS) + ("model.param_dtype",)

_DTYPE_FLAG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def source_dir(m, lay) -> Path:
    """The Hugging Face checkpoint the chain starts from."""
    return m.path_of("model.hf_dir") if m.data["model"].get("hf_dir") and \
        (m.path_of("model.hf_dir") / "config.json").exists() else lay.init_weights


def _init_weights(ctx: Context) -> None:
    from qwenbuild.weights.random_init import write_random_hf_model

    with ctx.output_dir(ctx.layout.init_weights) as tmp:
        write_random_hf_model(ctx.manifest.model, ctx["model.init_seed"], tmp)


def _convert(ctx: Context) -> None:
    from qwenbuild.weights import convert_weight

    convert_weight(source_dir(ctx.manifest, ctx.layout), ctx.layout.converted,
                   dtype=_DTYPE_FLAG[ctx["model.param_dtype"]])


def hf_files(directory: Path) -> list[Path]:
    names = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
             "pytorch_model.bin.index.json")
    return sorted({p for pattern in names for p in directory.glob(pattern) if p.is_file()})


def specs(m, lay) -> list[TaskSpec]:
    out = []
    src = source_dir(m, lay)
    if src == lay.init_weights:
        out.append(TaskSpec("init_weights", "generate the tiny starting checkpoint (HF layout) from model.init_seed",
                            _init_weights, keys=MODEL_KEYS + ("model.init_seed",), dir_outputs=[lay.init_weights],
                            packages=("numpy", "safetensors")))
        inputs = [lay.sealed(lay.init_weights)]
    else:
        inputs = hf_files(src)
    out.append(TaskSpec("convert", "convert the HF checkpoint to one MindSpore .ckpt (convert_weight)", _convert,
                        keys=MODEL_KEYS + ("model.hf_dir",), inputs=inputs, outputs=[lay.converted],
                        packages=("mindspore", "numpy", "safetensors", "torch")))
    return out
