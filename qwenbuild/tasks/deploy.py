"""Tasks of deployment: MINDIR graphs per rank and lite.ini (together, `export`), and an inference run on the
exported graphs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from qwenbuild.export.graph_files import GraphDirs
from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.mindir import export_mindir
from qwenbuild.data.alpaca import user_text
from qwenbuild.infer.prompt import SEED_PROMPT
from qwenbuild.infer.runtime import generate_on_ranks
from qwenbuild.jsonfile import read_json
from qwenbuild.lock import Lock
from qwenbuild.manifest import deployment_dtype
from qwenbuild.parallel.launch_scripts import launch_scripts, mode_env, write_launch_scripts
from qwenbuild.parallel.rank_table import first_devices, write_rank_table
from qwenbuild.parallel.reshard import transform_ckpt
from qwenbuild.parallel.strategy import write_strategy_files
from qwenbuild.store import write_seal
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.distributed import WORKER_MODULE, in_build, keyed_dir, node_devices, rank_table_file
from qwenbuild.tasks.train import RUN_CONFIG_KEYS, run_settings, run_yaml
from qwenbuild.train.mindformers_yaml import predict_config, write_yaml
from qwenbuild.tasks.spec import Group, TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.train.evaluate import read_heldout

logger = logging.getLogger(__name__)

EXPORT_KEYS = ("export.checkpoint", "export.seq_length", "export.batch_size", "export.use_past",
               "export.model_parallel", "export.dtype", "parallel.vocab_emb_dp", "hardware.device")


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
    # the network casts the weights it is given to its parameter dtype: the graphs hold them in export.dtype
    cfg = dataclasses.replace(m.model.config, param_dtype=deployment_dtype(m))
    with ctx.output_dir(build.mindir_full) as full, ctx.output_dir(build.mindir_inc) as inc:
        export_mindir(cfg, build.export_shards / "shards" if mp > 1 else source, GraphDirs(full, inc),
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


def _predict(ctx: Context) -> None:
    """The seed's online predict: MindFormers' own Trainer.predict with use_past on the export topology's cards,
    from the complete checkpoint (MindFormers reshards it, auto_trans_ckpt), with the predict environment. Its
    output_dir is predict/output/, which holds nothing another task built: auto_trans_ckpt empties strategy/ and
    transformed_checkpoint/ there."""
    m, build, ex = ctx.manifest, ctx.build, ctx.manifest.export
    hw, mp = m.hardware, ex.model_parallel
    # predict.sh runs in build/predict/: the YAML names every path relative to it

    def here(path) -> str:
        return in_build(build, path, build.predict)

    settings = dataclasses.replace(run_settings(m, build, start=build.predict), output_dir=here(build.predict_output))
    run = run_yaml(m, build, settings, start=build.predict, micro_batch_num=1, vocab_emb_dp=True,
                   use_seq_parallel=False, recompute=False, gradient_aggregation_group=4)
    checkpoint = build.merged_file if ex.checkpoint == "finetuned" else build.converted
    target = "ascend" if hw.device == "ascend" or mp > 1 else "cpu"
    content = predict_config(run, mp, here(checkpoint), ex.seq_length, ex.max_new_tokens, target,
                             dtype=deployment_dtype(m))
    script = predict_script(m, build, _question(ctx)[0])
    # two files, not the directory: predict/output/ beside them is MindFormers' and stays
    write_yaml(build.predict_yaml, run, target, content, "online predict")
    write_launch_scripts(build.predict, {build.predict_script.name: script})
    logger.info(f"predict: {build.predict_yaml.name} ({target}, dp 1 x mp {mp}) and {build.predict_script.name} -> "
                f"{build.predict}")


def predict_script(m, build, prompt: str) -> str:
    """predict.sh: MindFormers' predict of the prompt on the export topology, with the predict environment."""
    command = ["-m", WORKER_MODULE["mindformers"], "--config", build.predict_yaml, "--run_mode", "predict",
               "--predict_data", prompt, "--use_parallel", str(m.export.model_parallel > 1)]
    return _export_topology_script(m, build, command, build.predict_output / "msrun_log", build.predict, "predict")


def _export_topology_script(m, build, command: list, log_dir, workdir, mode: str) -> str:
    """The script of node 0 alone on its first export.model_parallel cards (the export topology, its own rank table
    on Ascend), on the nodes' own Python, in the environment of `mode`. It runs in `workdir`, the directory it lies
    in, found from where it lies; every build path in it is relative to that directory, so a copied project's script
    names the copy's files."""
    hw, mp = m.hardware, m.export.model_parallel
    node = dict(node_devices(m)[0], device_ids=hw.device_ids(hw.nodes[0])[:mp])
    command = [in_build(build, a, workdir) if isinstance(a, Path) else a for a in command]
    return launch_scripts([node], mp, command, device=hw.device, master_port=hw.master_port,
                          log_dir=in_build(build, log_dir, workdir), env=mode_env(mode, hw.device), python=hw.python,
                          env_script=hw.env_script, workdir=str(workdir), workdir_from_script=".",
                          rank_table_file=in_build(build, build.export_rank_table, workdir)
                          if hw.device == "ascend" else None)["node_0.sh"]


def _lite_infer(ctx: Context) -> None:
    """The seed's multi-card MindSpore Lite inference: one process per export rank (msrun on node 0's first
    export.model_parallel cards, the export rank table on Ascend), each running run_qwen1_5_mslite_infer with the
    original's flags on its rank's graphs; MindSpore Lite on Ascend, MindSpore's GraphCell on CPU."""
    m, build, ex = ctx.manifest, ctx.build, ctx.manifest.export
    script = lite_infer_script(m, build, _question(ctx)[0])
    write_launch_scripts(build.lite_infer, {build.lite_infer_script.name: script})
    logger.info(f"lite_infer: {build.lite_infer_script} ({ex.model_parallel} rank(s), {_lite_backend(m)})")


def _lite_backend(m) -> str:
    return "lite" if m.hardware.device == "ascend" else "graphcell"


def lite_infer_script(m, build, prompt: str) -> str:
    """lite_infer.sh: run_qwen1_5_mslite_infer with the original's flags on every export rank's graphs."""
    ex = m.export
    command = ["-m", "qwenbuild", "run_qwen1_5_mslite_infer",
               "--mindir_root_dir", build.export, "--seq_length", str(ex.seq_length),
               "--batch_size", str(ex.batch_size), "--do_sample", "False",
               "--vocab_file", build.tokenizer / "vocab.json", "--merge_file", build.tokenizer / "merges.txt",
               "--ge_config_path", build.lite_ini, "--predict_data", prompt,
               "--max_new_tokens", str(ex.max_new_tokens), "--backend", _lite_backend(m), "--json"]
    return _export_topology_script(m, build, command, build.lite_infer / "msrun_log", build.lite_infer, "export")


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
    result = generate_on_ranks(build.export, build.tokenizer, prompt, max_new_tokens=ex.max_new_tokens,
                               backend="graphcell", batch_size=ex.batch_size, seq_length=ex.seq_length,
                               progress=logger.info)
    doc = result.to_json()
    answer = {"prompt": prompt, "text": doc["text"][0], "prompt_ids": doc["prompt_ids"][0],
              "generated_ids": doc["generated_ids"][0], **({"expected": expected} if expected is not None else {})}
    with ctx.output_file(build.infer) as tmp:
        tmp.write_text(json.dumps(answer, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    beside = "" if expected is None else f" (expected {expected!r})"
    logger.info(f"infer: {prompt!r} -> {answer['text']!r}{beside}")


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
        _lite_infer_spec(m, build),
        TaskSpec("infer", "answer export.predict_data (or a held-out question) with the exported graphs (greedy)",
                 _infer, keys=("export.predict_data", "export.max_new_tokens", "export.batch_size",
                               "export.seq_length", "dataset.source"),
                 inputs=[build.mindir_full, build.mindir_inc, build.tokenizer] + ([build.dataset]
                                                                                  if heldout_question else []),
                 outputs=[build.infer],
                 packages=("mindspore", "numpy", "tokenizers", "transformers"), machine=() if ascend else ("cpu",)),
    ]


def _predict_spec(m, build) -> TaskSpec:
    ascend = m.hardware.device == "ascend"
    return TaskSpec("predict", "MindFormers online predict: predict_qwen1_5.yaml (use_past) and predict.sh (msrun on "
                               "the export topology, the predict environment)", _predict,
                    keys=RUN_CONFIG_KEYS + EXPORT_KEYS + ("export.predict_data", "export.max_new_tokens", "hardware",
                                                          "dataset.source"),
                    inputs=[build.tokenizer] + ([build.export_rank_table] if ascend else [])
                    + _question_inputs(m, build),
                    outputs=[build.predict_yaml, build.predict_script], packages=("mindformers",))


def _lite_infer_spec(m, build) -> TaskSpec:
    ascend = m.hardware.device == "ascend"
    return TaskSpec("lite_infer", "lite_infer.sh: the original's MindSpore Lite inference, one process per export "
                                  "rank (msrun, the export rank table on Ascend)", _lite_infer,
                    keys=("export.seq_length", "export.batch_size", "export.model_parallel", "export.max_new_tokens",
                          "export.predict_data", "dataset.source", "hardware"),
                    inputs=[build.tokenizer, build.lite_ini] + ([build.export_rank_table] if ascend else [])
                    + _question_inputs(m, build),
                    outputs=[build.lite_infer_script])


def _question_inputs(m, build) -> list[Path]:
    """The held-out questions, when the prompt is the first of them."""
    return [build.dataset] if m.export.predict_data is None and m.dataset.source == "builtin" else []


def groups(m) -> list[Group]:
    return [Group("export", "MINDIR graphs, lite.ini and lite_infer.sh, what the original export step hands over "
                            "to MindSpore Lite", ["mindir", "lite_ini", "lite_infer"])]
