"""Tasks of deployment: MINDIR graphs per rank and lite.ini (together, `export`), and an inference run on the
exported graphs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwenbuild.export.graph_files import GraphDirs
from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.mindir import export_mindir
from qwenbuild.data.alpaca import user_text
from qwenbuild.infer.prompt import SEED_PROMPT
from qwenbuild.infer.runtime import generate_on_ranks, print_progress
from qwenbuild.jsonfile import read_json
from qwenbuild.lock import Lock
from qwenbuild.parallel.launch_scripts import launch_scripts, mode_env, write_launch_scripts
from qwenbuild.parallel.rank_table import first_devices, write_rank_table
from qwenbuild.parallel.reshard import transform_ckpt
from qwenbuild.parallel.strategy import write_strategy_files
from qwenbuild.store import write_seal
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.distributed import (WORKER_MODULE, in_build, keyed_dir, module_script, node_devices,
                                         rank_table_file)
from qwenbuild.tasks.train import RUN_CONFIG_KEYS, run_settings
from qwenbuild.tokenizer.files import ENDOFTEXT, read_vocab, special_ids
from qwenbuild.train.mindformers_yaml import RunYaml, predict_config, write_yaml
from qwenbuild.tasks.spec import Group, TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.train.evaluate import read_heldout

EXPORT_KEYS = ("export.checkpoint", "export.seq_length", "export.batch_size", "export.use_past",
               "export.model_parallel", "parallel.vocab_emb_dp")


def _export_shards(ctx: Context, source) -> None:
    """The source weights cut for the export topology (dp 1 x export.model_parallel x pp 1), cached by content."""
    m, build = ctx.manifest, ctx.build
    mp, vocab_emb_dp = m.export.model_parallel, m.parallel.vocab_emb_dp

    def make(tmp) -> None:
        write_strategy_files(m.model.config, 1, mp, 1, tmp / "strategy", vocab_emb_dp)
        # one seal for the whole directory: the shards' own would be a member of it
        transform_ckpt("", tmp / "strategy", source, tmp / "shards", progress=None, seal=False)
        write_seal(tmp)

    keyed_dir(build, build.export_shards, {"source": Lock(build.lock).digest_of(source, build.root),
                                           "model_parallel": mp, "vocab_emb_dp": vocab_emb_dp}, make, "mindir")


def _export(ctx: Context) -> None:
    m, build, ex = ctx.manifest, ctx.build, ctx.manifest.export
    source = build.merged_file if ex.checkpoint == "finetuned" else build.converted
    mp = ex.model_parallel
    if mp > 1:
        _export_shards(ctx, source)
    with ctx.output_dir(build.mindir_full) as full, ctx.output_dir(build.mindir_inc) as inc:
        export_mindir(m.model.config, build.export_shards / "shards" if mp > 1 else source, GraphDirs(full, inc),
                      batch_size=ex.batch_size, seq_length=ex.seq_length, tokenizer_dir=build.tokenizer,
                      model_parallel=mp, strategy_dir=build.export_shards / "strategy" if mp > 1 else None)


def _lite_ini(ctx: Context) -> None:
    m, build = ctx.manifest, ctx.build
    table = None
    if m.hardware.device == "ascend":
        # the export topology has its own table: the first export.model_parallel devices of node 0
        cluster = read_json(rank_table_file(m, build), "rank table")
        write_rank_table(first_devices(cluster, m.export.model_parallel), build.export_rank_table)
        table = build.export_rank_table if m.export.model_parallel > 1 else None
    write_lite_ini(build.lite_ini, rank_table_file=table, overrides=m.value("lite"))


PREDICT_YAML = "predict_qwen1_5.yaml"


def _predict(ctx: Context) -> None:
    """The seed's online predict: MindFormers' own Trainer.predict with use_past on the export topology's cards,
    from the complete checkpoint (MindFormers reshards it, auto_trans_ckpt), with the predict environment."""
    m, build, ex = ctx.manifest, ctx.build, ctx.manifest.export
    hw, mp = m.hardware, ex.model_parallel
    settings = run_settings(m, build)
    pad = special_ids(read_vocab(build.tokenizer / "vocab.json"))[ENDOFTEXT]
    run = RunYaml(settings, micro_batch_num=1, vocab_emb_dp=True, use_seq_parallel=False, recompute=False,
                  gradient_aggregation_group=4, vocab_file=in_build(build, build.tokenizer / "vocab.json"),
                  merges_file=in_build(build, build.tokenizer / "merges.txt"), pad_token_id=pad, eos_token_id=pad)
    checkpoint = build.merged_file if ex.checkpoint == "finetuned" else build.converted
    target = "ascend" if hw.device == "ascend" or mp > 1 else "cpu"
    content = predict_config(run, mp, in_build(build, checkpoint), ex.seq_length, ex.max_new_tokens, target)
    prompt = _question(ctx)[0]
    command = [module_script(WORKER_MODULE["mindformers"]), "--config", in_build(build, build.predict / PREDICT_YAML),
               "--run_mode", "predict", "--predict_data", prompt, "--use_parallel", str(mp > 1)]
    node = dict(node_devices(m)[0], device_ids=hw.device_ids(hw.nodes[0])[:mp])
    # predict.sh runs in the build dir, found from where the script lies: every path in it and the YAML is relative
    scripts = launch_scripts([node], mp, command, device=hw.device, master_port=hw.master_port,
                             log_dir=in_build(build, build.predict / "msrun_log"), env=mode_env("predict", hw.device),
                             python_bin_dir=Path(sys.executable).parent, workdir_from_script="..",
                             rank_table_file=in_build(build, build.export_rank_table) if hw.device == "ascend"
                             else None)
    with ctx.output_dir(build.predict) as tmp:
        write_yaml(tmp / PREDICT_YAML, run, target, content, "online predict")
        write_launch_scripts(tmp, {"predict.sh": scripts["node_0.sh"]})
    print(f"predict: {PREDICT_YAML} ({target}, dp 1 x mp {mp}) and predict.sh -> {build.predict}", file=sys.stderr)


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
    result = generate_on_ranks(build.output, build.tokenizer, prompt, max_new_tokens=ex.max_new_tokens,
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
    ascend = m.hardware.device == "ascend"
    heldout_question = m.export.predict_data is None and m.dataset.source == "builtin"
    return [
        TaskSpec("mindir", "MINDIR prefill (full) and decode (inc) graphs per rank of the export topology",
                 _export, keys=MODEL_KEYS + EXPORT_KEYS, inputs=[build.merged if finetuned else build.converted,
                                                                 build.tokenizer],
                 dir_outputs=[build.mindir_full, build.mindir_inc]
                 + ([build.export_shards] if m.export.model_parallel > 1 else []), packages=("mindspore", "numpy")),
        TaskSpec("lite_ini", "lite.ini for MindSpore Lite (GE provider; the export topology's rank table on Ascend)",
                 _lite_ini, keys=("lite", "export.model_parallel", "hardware.device", "hardware.nodes",
                                  "hardware.devices_per_node"),
                 inputs=[build.rank_table] if ascend else [],
                 # on Ascend lite.ini names the export rank table by its path (MindSpore Lite's cwd is unknown)
                 outputs=[build.lite_ini] + ([build.export_rank_table] if ascend else []), names_build_dir=ascend),
        _predict_spec(m, build),
        TaskSpec("infer", "answer export.predict_data (or a held-out question) with the exported graphs (greedy)",
                 _infer, keys=("export.predict_data", "export.max_new_tokens", "export.batch_size",
                               "export.seq_length", "dataset.source"),
                 inputs=[build.mindir_full, build.mindir_inc, build.tokenizer] + ([build.dataset]
                                                                                  if heldout_question else []),
                 outputs=[build.infer],
                 packages=("mindspore", "numpy", "tokenizers", "transformers")),
    ]


def _predict_spec(m, build) -> TaskSpec:
    ascend = m.hardware.device == "ascend"
    return TaskSpec("predict", "MindFormers online predict: predict_qwen1_5.yaml (use_past) and predict.sh (msrun on "
                               "the export topology, the predict environment)", _predict,
                    keys=RUN_CONFIG_KEYS + EXPORT_KEYS + ("export.predict_data", "export.max_new_tokens", "hardware",
                                                          "dataset.source"),
                    inputs=[build.tokenizer] + ([build.export_rank_table] if ascend else [])
                    + ([build.dataset] if m.export.predict_data is None and m.dataset.source == "builtin" else []),
                    dir_outputs=[build.predict], packages=("mindformers",))


def groups(m) -> list[Group]:
    return [Group("export", "MINDIR graphs and lite.ini, what the original export step hands over", ["mindir",
                                                                                                    "lite_ini"])]
