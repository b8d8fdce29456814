"""Tasks of deployment: MINDIR graphs per rank and lite.ini (together, `export`), and an inference run on the
exported graphs."""

from __future__ import annotations

import json
import sys

from qwenbuild.export.graph_files import GraphDirs
from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.mindir import export_mindir
from qwenbuild.data.alpaca import user_text
from qwenbuild.infer.prompt import SEED_PROMPT
from qwenbuild.infer.runtime import generate, print_progress
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.distributed import rank_table_file
from qwenbuild.tasks.spec import Group, TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.train.evaluate import read_heldout

EXPORT_KEYS = ("export.checkpoint", "export.seq_length", "export.batch_size", "export.use_past",
               "parallel.model_parallel")


def export_ranks(m) -> list[int]:
    """Ranks whose graphs are exported: every rank of a model-parallel plan, else rank 0 (all ranks are equal)."""
    mp = m.parallel.model_parallel
    return list(range(mp)) if mp > 1 else [0]


def _export(ctx: Context) -> None:
    m, build, ex = ctx.manifest, ctx.build, ctx.manifest.export
    with ctx.output_dir(build.mindir_full) as full, ctx.output_dir(build.mindir_inc) as inc:
        for rank in export_ranks(m):
            ckpt = build.merged_file if ex.checkpoint == "finetuned" else build.converted
            export_mindir(m.model.config, ckpt, GraphDirs(full, inc), rank=rank, batch_size=ex.batch_size,
                          seq_length=ex.seq_length, tokenizer_dir=build.tokenizer)


def _lite_ini(ctx: Context) -> None:
    m = ctx.manifest
    table = rank_table_file(m, ctx.build) if len(export_ranks(m)) > 1 else None
    write_lite_ini(ctx.build.lite_ini, rank_table_file=table, overrides=m.value("lite"))


def _question(ctx: Context) -> tuple[str, str | None]:
    """(prompt, expected answer or None): export.predict_data, else a question the default model learned to answer."""
    m = ctx.manifest
    if m.export.predict_data is not None:
        return m.export.predict_data, None
    if m.dataset.source == "builtin":
        row = read_heldout(ctx.build.heldout)[0]
        return user_text(row["instruction"], row.get("input", "")), row["output"]
    return SEED_PROMPT, None


def _infer(ctx: Context) -> None:
    build, ex = ctx.build, ctx.manifest.export
    prompt, expected = _question(ctx)
    result = generate(build.output, build.tokenizer, prompt, max_new_tokens=ex.max_new_tokens,
                      backend="graphcell", batch_size=ex.batch_size, seq_length=ex.seq_length,
                      progress=print_progress)
    doc = result.to_json()
    answer = {"prompt": prompt, "text": doc["text"][0], "prompt_ids": doc["prompt_ids"][0],
              "generated_ids": doc["generated_ids"][0], **({"expected": expected} if expected is not None else {})}
    with ctx.output_file(build.infer) as tmp:
        tmp.write_text(json.dumps(answer, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    beside = "" if expected is None else f" (expected {expected!r})"
    print(f"infer: {prompt!r} -> {answer['text']!r}{beside}", file=sys.stderr)


def specs(m, build) -> list[TaskSpec]:
    finetuned = m.export.checkpoint == "finetuned"
    ascend_multi = m.hardware.device == "ascend" and len(export_ranks(m)) > 1
    heldout_question = m.export.predict_data is None and m.dataset.source == "builtin"
    return [
        TaskSpec("mindir", "MINDIR prefill (full) and decode (inc) graphs per rank", _export,
                 keys=MODEL_KEYS + EXPORT_KEYS, inputs=[build.merged if finetuned else build.converted,
                                                        build.tokenizer],
                 dir_outputs=[build.mindir_full, build.mindir_inc], packages=("mindspore", "numpy")),
        TaskSpec("lite_ini", "lite.ini for MindSpore Lite (GE provider; rank table when several ranks)", _lite_ini,
                 keys=("lite", "parallel.model_parallel", "hardware.device", "hardware.nodes",
                       "hardware.devices_per_node"),
                 inputs=[build.rank_table] if ascend_multi else [], outputs=[build.lite_ini]),
        TaskSpec("infer", "answer export.predict_data (or a held-out question) with the exported graphs (greedy)",
                 _infer, keys=("export.predict_data", "export.max_new_tokens", "export.batch_size",
                               "export.seq_length", "dataset.source"),
                 inputs=[build.mindir_full, build.mindir_inc, build.tokenizer] + ([build.dataset]
                                                                                  if heldout_question else []),
                 outputs=[build.infer],
                 packages=("mindspore", "numpy", "tokenizers", "transformers")),
    ]


def groups(m) -> list[Group]:
    return [Group("export", "MINDIR graphs and lite.ini, what the original export step hands over", ["mindir",
                                                                                                    "lite_ini"])]
