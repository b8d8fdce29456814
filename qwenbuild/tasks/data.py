"""Tasks of the data chain: builtin dataset -> alpaca ChatML -> tokenizer -> MindRecord."""

from __future__ import annotations

import shutil

from qwenbuild.data.corpus import corpus_texts
from qwenbuild.errors import UserError
from qwenbuild.tasks._spec import Context, TaskSpec


def _dataset(ctx: Context) -> None:
    from qwenbuild.data.instructions import write_instruction_dataset

    with ctx.output_dir(ctx.layout.dataset) as tmp:
        write_instruction_dataset(tmp, seed=ctx["dataset.seed"], num_train=ctx["dataset.num_train"],
                                  num_heldout=ctx["dataset.num_heldout"])


def _alpaca(ctx: Context) -> None:
    from qwenbuild.data.alpaca import convert_alpaca

    source = ctx.path("dataset.path") if ctx["dataset.source"] == "alpaca" else ctx.layout.dataset / "train.json"
    if not source.is_file():
        raise UserError(f"{source} does not exist", hint="fix dataset.path in qwen.toml")
    convert_alpaca(source, ctx.layout.alpaca_messages, skip_bad_rows=ctx["dataset.skip_bad_rows"])


def _tokenizer(ctx: Context) -> None:
    from qwenbuild import tokenizer

    kind = ctx["tokenizer.kind"]
    with ctx.output_dir(ctx.layout.tokenizer) as tmp:
        if kind == "qwen":
            tokenizer.build_qwen_tokenizer(tmp)
        elif kind == "trained":
            tokenizer.train_tokenizer(corpus_texts([ctx.layout.alpaca_messages]), ctx["tokenizer.vocab_size"], tmp)
        else:
            source = ctx.path("tokenizer.dir") or ctx.path("model.hf_dir")
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)


def _mindrecord(ctx: Context) -> None:
    from qwenbuild.data.preprocess import preprocess

    lay = ctx.layout
    with ctx.output_dir(lay.mindrecord) as tmp:
        preprocess(lay.alpaca_messages, lay.tokenizer / "vocab.json", lay.tokenizer / "merges.txt",
                   seq_length=ctx["dataset.seq_length"], output_file=tmp / lay.mindrecord_file.name,
                   file_partition=ctx["dataset.file_partition"], mask_prompt=ctx["dataset.mask_prompt"])


def specs(m, lay) -> list[TaskSpec]:
    out = []
    builtin = m.data["dataset"]["source"] == "builtin"
    if builtin:
        out.append(TaskSpec("dataset", "generate the project's own instruction dataset (train and held-out)",
                            _dataset, keys=("dataset.seed", "dataset.num_train", "dataset.num_heldout"),
                            dir_outputs=[lay.dataset]))
    source = [lay.sealed(lay.dataset)] if builtin else [m.path_of("dataset.path")]
    out.append(TaskSpec("alpaca", "convert alpaca rows to ChatML messages (alpaca_converter)", _alpaca,
                        keys=("dataset.source", "dataset.path", "dataset.skip_bad_rows"), inputs=source,
                        outputs=[lay.alpaca_messages]))
    kind = m.data["tokenizer"]["kind"]
    tok_inputs, tok_keys = [], ("tokenizer.kind",)
    if kind == "trained":
        tok_inputs, tok_keys = [lay.alpaca_messages], ("tokenizer.kind", "tokenizer.vocab_size")
    elif kind == "hf":
        src = m.path_of("tokenizer.dir") or m.path_of("model.hf_dir")
        tok_inputs = [src / "vocab.json", src / "merges.txt"]
        tok_keys = ("tokenizer.kind", "tokenizer.dir", "model.hf_dir")
    out.append(TaskSpec("tokenizer", "vocab.json + merges.txt of the Qwen tokenizer (real, trained, or copied)",
                        _tokenizer, keys=tok_keys, inputs=tok_inputs, dir_outputs=[lay.tokenizer],
                        packages=("tokenizers", "transformers")))
    out.append(TaskSpec("mindrecord", "tokenize ChatML into the MindRecord finetune reads (qwen1_5_preprocess)",
                        _mindrecord, keys=("dataset.seq_length", "dataset.mask_prompt", "dataset.file_partition"),
                        inputs=[lay.alpaca_messages, lay.sealed(lay.tokenizer)], dir_outputs=[lay.mindrecord],
                        packages=("mindspore", "tokenizers", "transformers")))
    return out
