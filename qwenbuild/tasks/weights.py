"""Tasks of the weights: random starting checkpoint (no hf_dir) and HF -> MindSpore conversion."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.manifest.sections import Model
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.weights import convert_weight, write_random_hf_model

# the resolved network: every QwenConfig field, as [model] holds it once the preset or hf_dir is applied
MODEL_KEYS = tuple(f"model.{name}" for name in Model.READS["config"])

_DTYPE_FLAG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HF_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
            "pytorch_model.bin.index.json")


def source_dir(m, build) -> Path:
    """The Hugging Face checkpoint the chain starts from: model.hf_dir once it exists, else the random one."""
    hf_dir = m.path_of("model.hf_dir")
    return hf_dir if hf_dir is not None and (hf_dir / "config.json").exists() else build.init_weights


def _init_weights(ctx: Context) -> None:
    with ctx.output_dir(ctx.build.init_weights) as tmp:
        write_random_hf_model(ctx.manifest.model.config, ctx.manifest.model.init_seed, tmp)


def _convert(ctx: Context) -> None:
    convert_weight(source_dir(ctx.manifest, ctx.build), ctx.build.converted,
                   dtype=_DTYPE_FLAG[ctx.manifest.model.param_dtype])


def hf_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in HF_FILES for p in directory.glob(pattern) if p.is_file()})


def specs(m, build) -> list[TaskSpec]:
    out = []
    src = source_dir(m, build)
    if src == build.init_weights:
        out.append(TaskSpec("init_weights", "generate the tiny starting checkpoint (Hugging Face format) from model.init_seed",
                            _init_weights, keys=MODEL_KEYS + ("model.init_seed",), dir_outputs=[build.init_weights],
                            packages=("numpy", "safetensors")))
        inputs = [build.init_weights]
    else:
        inputs = hf_files(src)
    out.append(TaskSpec("convert", "convert the HF checkpoint to one MindSpore .ckpt (convert_weight)", _convert,
                        keys=MODEL_KEYS + ("model.hf_dir",), inputs=inputs, outputs=[build.converted],
                        packages=("mindspore", "numpy", "safetensors", "torch")))
    return out
