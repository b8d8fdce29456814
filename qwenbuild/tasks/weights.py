"""Tasks of the weights: random starting checkpoint (no hf_dir) and HF -> MindSpore conversion."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.errors import UserError
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
    """The Hugging Face checkpoint the chain starts from: model.hf_dir, or the seeded random one (init = "random")."""
    return build.init_weights if m.model.init == "random" else m.path_of("model.hf_dir")


def _init_weights(ctx: Context) -> None:
    with ctx.output_dir(ctx.build.init_weights) as tmp:
        write_random_hf_model(ctx.manifest.model.config, ctx.manifest.model.init_seed, tmp,
                              std=ctx.manifest.model.init_std)


def _convert(ctx: Context) -> None:
    source = source_dir(ctx.manifest, ctx.build)
    if not (source / "config.json").is_file():
        raise UserError(f"model.hf_dir {source} holds no config.json: the checkpoint to convert is not there",
                        hint="download the Hugging Face checkpoint into that directory (or fix model.hf_dir); "
                             "tasks that need no weights (rank_table, strategy, launch, run_config) build without it")
    convert_weight(source, ctx.build.converted, dtype=_DTYPE_FLAG[ctx.manifest.model.param_dtype])


def hf_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in HF_FILES for p in directory.glob(pattern) if p.is_file()})


def specs(m, build) -> list[TaskSpec]:
    out = []
    src = source_dir(m, build)
    if m.model.init == "random":
        out.append(TaskSpec("init_weights", "generate the tiny starting checkpoint (Hugging Face format) from model.init_seed",
                            _init_weights, keys=MODEL_KEYS + ("model.init_seed", "model.init_std"),
                            dir_outputs=[build.init_weights],
                            packages=("numpy", "safetensors")))
        inputs = [build.init_weights]
    else:
        inputs = hf_files(src) if src.is_dir() else []
    out.append(TaskSpec("convert", "convert the HF checkpoint to one MindSpore .ckpt (convert_weight)", _convert,
                        keys=MODEL_KEYS + ("model.init", "model.hf_dir"), inputs=inputs, outputs=[build.converted],
                        packages=("mindspore", "numpy", "safetensors", "torch")))
    return out
