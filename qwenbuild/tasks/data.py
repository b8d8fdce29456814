"""Tasks of the data chain: builtin dataset -> alpaca ChatML -> tokenizer -> MindRecord."""

from __future__ import annotations

import shutil

from qwenbuild import tokenizer
from qwenbuild.data.alpaca import convert_alpaca
from qwenbuild.data.corpus import corpus_texts
from qwenbuild.data.instructions import write_instruction_dataset
from qwenbuild.data.preprocess import preprocess
from qwenbuild.errors import UserError
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.spec import TaskSpec

HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def _dataset(ctx: Context) -> None:
    ds = ctx.manifest.dataset
    with ctx.output_dir(ctx.build.dataset) as tmp:
        write_instruction_dataset(tmp, seed=ds.seed, num_train=ds.num_train, num_heldout=ds.num_heldout)


def _alpaca(ctx: Context) -> None:
    ds = ctx.manifest.dataset
    source = ctx.manifest.path_of("dataset.path") if ds.source == "alpaca" else ctx.build.dataset / "train.json"
    if not source.is_file():
        raise UserError(f"{source} does not exist", hint="fix dataset.path in qwen.toml")
    convert_alpaca(source, ctx.build.alpaca_messages, skip_bad_rows=ds.skip_bad_rows)


def tokenizer_source(m):
    """The directory an `hf` tokenizer is copied from: tokenizer.dir, else model.hf_dir."""
    return m.path_of("tokenizer.dir") or m.path_of("model.hf_dir")


def _tokenizer(ctx: Context) -> None:
    kind = ctx.manifest.tokenizer.kind
    with ctx.output_dir(ctx.build.tokenizer) as tmp:
        if kind == "qwen":
            tokenizer.build_qwen_tokenizer(tmp)
        elif kind == "trained":
            tokenizer.train_tokenizer(corpus_texts([ctx.build.alpaca_messages]), ctx.manifest.tokenizer.vocab_size,
                                      tmp)
        else:
            source = tokenizer_source(ctx.manifest)
            for name in HF_TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)


def _mindrecord(ctx: Context) -> None:
    build, ds = ctx.build, ctx.manifest.dataset
    with ctx.output_dir(build.mindrecord) as tmp:
        preprocess(build.alpaca_messages, build.tokenizer / "vocab.json", build.tokenizer / "merges.txt",
                   seq_length=ds.seq_length, output_file=tmp / build.mindrecord_file.name,
                   file_partition=ds.file_partition, mask_prompt=ds.mask_prompt)


def specs(m, build) -> list[TaskSpec]:
    out = []
    builtin = m.dataset.source == "builtin"
    if builtin:
        out.append(TaskSpec("dataset", "generate the project's own instruction dataset (train and held-out)",
                            _dataset, keys=("dataset.seed", "dataset.num_train", "dataset.num_heldout"),
                            dir_outputs=[build.dataset]))
    out.append(TaskSpec("alpaca", "convert alpaca rows to ChatML messages (alpaca_converter)", _alpaca,
                        keys=("dataset.source", "dataset.path", "dataset.skip_bad_rows"),
                        inputs=[build.dataset] if builtin else [m.path_of("dataset.path")],
                        outputs=[build.alpaca_messages]))
    tok_inputs, tok_keys = [], ("tokenizer.kind",)
    if m.tokenizer.kind == "trained":
        tok_inputs, tok_keys = [build.alpaca_messages], ("tokenizer.kind", "tokenizer.vocab_size")
    elif m.tokenizer.kind == "hf":
        source = tokenizer_source(m)
        tok_inputs = [source / name for name in HF_TOKENIZER_FILES if name != "tokenizer_config.json"
                      or (source / name).is_file()]
        tok_keys = ("tokenizer.kind", "tokenizer.dir", "model.hf_dir")
    out.append(TaskSpec("tokenizer", "vocab.json + merges.txt of the Qwen tokenizer (real, trained, or copied)",
                        _tokenizer, keys=tok_keys, inputs=tok_inputs, dir_outputs=[build.tokenizer],
                        packages=("tokenizers", "transformers")))
    out.append(TaskSpec("mindrecord", "tokenize ChatML into the MindRecord finetune reads (qwen1_5_preprocess)",
                        _mindrecord, keys=("dataset.seq_length", "dataset.mask_prompt", "dataset.file_partition"),
                        inputs=[build.alpaca_messages, build.tokenizer], dir_outputs=[build.mindrecord],
                        packages=("mindspore", "tokenizers", "transformers")))
    return out
