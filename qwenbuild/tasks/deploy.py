"""Tasks of deployment: MINDIR export per rank, lite.ini, and an inference run on the exported graphs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.tasks._spec import Context, TaskSpec
from qwenbuild.tasks.distributed import rank_table_file
from qwenbuild.tasks.weights import MODEL_KEYS

EXPORT_KEYS = ("export.checkpoint", "export.seq_length", "export.batch_size", "export.use_past",
               "parallel.data_parallel", "parallel.model_parallel", "parallel.pipeline_stage")


def finetuned_checkpoint(lay, rank: int) -> Path:
    """The last checkpoint finetune left for `rank` (meta.json names it, as MindFormers' monitor does)."""
    from qwenbuild.train.checkpoint import rank_dir, read_meta

    name = read_meta(lay.output, rank).get("last_ckpt_file")
    if not name or not (rank_dir(lay.output, rank) / name).is_file():
        raise UserError(f"no finished checkpoint in {rank_dir(lay.output, rank)}",
                        hint="run `doit finetune` first, or set export.checkpoint = \"converted\"")
    return rank_dir(lay.output, rank) / name


def export_ranks(m) -> list[int]:
    """Ranks whose graphs are exported: every rank of a model-parallel plan, else rank 0 (all ranks are equal)."""
    par = m.data["parallel"]
    return list(range(par["model_parallel"])) if par["model_parallel"] > 1 else [0]


def _export(ctx: Context) -> None:
    from qwenbuild.export.mindir import export_mindir

    m, lay = ctx.manifest, ctx.layout
    ex = m.data["export"]
    ranks = export_ranks(m)
    with ctx.output_dir(lay.mindir_full) as full, ctx.output_dir(lay.mindir_inc) as inc:
        # export into a scratch root whose two graph dirs are the temporaries promoted together
        scratch = full.parent / (full.name + ".root")
        scratch.mkdir()
        try:
            (scratch / "mindir_full_checkpoint").symlink_to(full.resolve())
            (scratch / "mindir_inc_checkpoint").symlink_to(inc.resolve())
            for rank in ranks:
                ckpt = finetuned_checkpoint(lay, rank) if ex["checkpoint"] == "finetuned" else lay.converted
                export_mindir(m.model, ckpt, scratch, rank=rank, batch_size=ex["batch_size"],
                              seq_length=ex["seq_length"], tokenizer_dir=lay.tokenizer)
        finally:
            for link in scratch.iterdir():
                link.unlink()
            scratch.rmdir()


def _lite_ini(ctx: Context) -> None:
    from qwenbuild.export.lite_ini import write_lite_ini

    m, lay = ctx.manifest, ctx.layout
    several = len(export_ranks(m)) > 1
    table = rank_table_file(m, lay) if several else None
    write_lite_ini(lay.lite_ini, rank_table_file=table, overrides=m.data["lite"])


def _infer(ctx: Context) -> None:
    from qwenbuild.infer.runtime import generate, print_progress

    m, lay = ctx.manifest, ctx.layout
    ex = m.data["export"]
    result = generate(lay.output, lay.tokenizer, ex["predict_data"], max_new_tokens=ex["max_new_tokens"],
                      backend="graphcell", batch_size=ex["batch_size"], seq_length=ex["seq_length"],
                      progress=print_progress)
    doc = result.to_json()
    answer = {"prompt": ex["predict_data"], "text": doc["text"][0], "prompt_ids": doc["prompt_ids"][0],
              "generated_ids": doc["generated_ids"][0]}
    with ctx.output_file(lay.infer) as tmp:
        tmp.write_text(json.dumps(answer, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"infer: {ex['predict_data']!r} -> {answer['text']!r}", file=sys.stderr)


def specs(m, lay) -> list[TaskSpec]:
    finetuned = m.data["export"]["checkpoint"] == "finetuned"
    source = [lay.sealed(lay.checkpoint)] if finetuned else [lay.converted]
    ascend_multi = m.data["hardware"]["device"] == "ascend" and len(export_ranks(m)) > 1
    return [
        TaskSpec("export", "MINDIR prefill (full) and decode (inc) graphs per rank", _export,
                 keys=MODEL_KEYS + EXPORT_KEYS, inputs=source + [lay.sealed(lay.tokenizer)],
                 dir_outputs=[lay.mindir_full, lay.mindir_inc], packages=("mindspore", "numpy")),
        TaskSpec("lite_ini", "lite.ini for MindSpore Lite (GE provider; rank table when several ranks)", _lite_ini,
                 keys=("lite", "parallel.model_parallel", "hardware.device"),
                 inputs=[lay.sealed(lay.rank_table)] if ascend_multi else [], outputs=[lay.lite_ini]),
        TaskSpec("infer", "answer export.predict_data with the exported graphs (greedy)", _infer,
                 keys=("export.predict_data", "export.max_new_tokens", "export.batch_size", "export.seq_length"),
                 inputs=[lay.sealed(lay.mindir_full), lay.sealed(lay.mindir_inc), lay.sealed(lay.tokenizer)],
                 outputs=[lay.infer], packages=("mindspore", "numpy", "tokenizers", "transformers")),
    ]
