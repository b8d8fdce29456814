"""Tasks of training: the run configuration (run.json, MindFormers YAML) and finetune itself."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

from qwenbuild.data.mindrecord import shard_files
from qwenbuild.digests import content_digest, json_digest
from qwenbuild.errors import UserError
from qwenbuild.lock import Lock, check_artifact
from qwenbuild.model.params import CONFIG_ENTRY, is_beside_weights
from qwenbuild.parallel.reshard import transform_ckpt
from qwenbuild.parallel.strategy import collect_strategy_files
from qwenbuild.store import read_seal, seal_path, write_seal
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.distributed import keyed_dir, workers_per_node
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.tokenizer.files import ENDOFTEXT, read_vocab, special_ids
from qwenbuild.train import events
from qwenbuild.train.checkpoint import finished_checkpoint
from qwenbuild.train.data import check_mindrecord
from qwenbuild.train.evaluate import evaluate_heldout
from qwenbuild.train.finetune import total_steps
from qwenbuild.train.mindformers_yaml import RunYaml, default_target, write_yaml
from qwenbuild.train.msrun import run_node_script
from qwenbuild.train.settings import SCHEMA_KEYS, TrainSettings, read_run_json, write_run_json

# the rest of the parallel plan, which only MindFormers' YAML spells out
YAML_KEYS = ("parallel.micro_batch_num", "parallel.vocab_emb_dp", "parallel.use_seq_parallel", "parallel.recompute",
             "parallel.gradient_aggregation_group", "parallel.offset")
RUN_CONFIG_KEYS = MODEL_KEYS + tuple(SCHEMA_KEYS.values()) + ("dataset.file_partition", "hardware.device",
                                                              "hardware.device_memory_gb") + YAML_KEYS


def run_settings(m, build) -> TrainSettings:
    """run.json's settings: the qwen.toml keys of SCHEMA_KEYS by name, plus the build's paths."""
    # MindDataset finds the other shards of a MindRecord from any one of them
    train_data = shard_files(build.mindrecord_file, m.dataset.file_partition)[0]
    return TrainSettings(model=m.model.config, train_data=str(train_data), output_dir=str(build.output),
                         init_checkpoint=str(build.transformed), strategy_dir=str(build.strategy),
                         device_target="Ascend" if m.hardware.device == "ascend" else "CPU",
                         **{name: m.value(key) for name, key in SCHEMA_KEYS.items()})


def _run_config(ctx: Context) -> None:
    m, build, par = ctx.manifest, ctx.build, ctx.manifest.parallel
    settings = run_settings(m, build)
    write_run_json(build.run_json, settings)
    pad = special_ids(read_vocab(build.tokenizer / "vocab.json"))[ENDOFTEXT]
    run = RunYaml(settings, micro_batch_num=par.micro_batch_num, vocab_emb_dp=par.vocab_emb_dp,
                  use_seq_parallel=par.use_seq_parallel, recompute=par.recompute,
                  gradient_aggregation_group=par.gradient_aggregation_group, offset=par.stage_offset,
                  vocab_file=str(build.tokenizer / "vocab.json"), merges_file=str(build.tokenizer / "merges.txt"),
                  pad_token_id=pad, eos_token_id=pad, device_memory_gb=m.hardware.device_memory_gb)
    target = default_target(settings)
    write_yaml(build.mindformers_yaml, run, target)
    print(f"run_config: {build.run_json.name} and {build.mindformers_yaml.name} ({target}) -> {build.root}",
          file=sys.stderr)


def this_node(m) -> int:
    """Index of this machine in hardware.nodes: by host name or address; a one-node topology is always node 0."""
    nodes = m.hardware.nodes
    if len(nodes) == 1:
        return 0
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        addresses = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        addresses = set()
    for i, node in enumerate(nodes):
        if node.host in names or node.ip in addresses:
            return i
    raise UserError(f"this machine ({socket.gethostname()}) is none of hardware.nodes",
                    hint="run `doit finetune` on every node of the cluster, or launch build/launch/node_K.sh by hand")


def clear_checkpoints(directory) -> None:
    for rank_dir in directory.glob("rank_*") if directory.is_dir() else ():
        for path in [*rank_dir.glob("*.ckpt"), rank_dir / "meta.json"]:
            path.unlink(missing_ok=True)


def clear_compiled_strategies(directory) -> None:
    """The strategy files MindFormers compiled in an earlier finetune: this run's must not be mixed with them."""
    for path in directory.glob("*_rank_*.ckpt") if directory.is_dir() else ():
        path.unlink()


def drop_damaged_checkpoints(build) -> None:
    """Delete files of a finished run that no longer match its seal: resuming must never start from damaged bytes."""
    members = read_seal(build.checkpoint)
    if members is None:
        return
    stats = Lock(build.lock).read_stats()
    for rel, digest in members.items():
        path = build.checkpoint / rel
        if path.is_file() and check_artifact(path, {"kind": "file", "digest": digest}, stats):
            print(f"finetune: {path} changed since it was saved; training resumes without it", file=sys.stderr)
            path.unlink()


def _finetune(ctx: Context) -> None:
    m, build = ctx.manifest, ctx.build
    settings = read_run_json(build.run_json)  # refuses model/pipeline parallel on CPU with the reason
    # too few rows for one global batch is found here, before msrun starts workers that compile the graph
    steps = total_steps(settings, check_mindrecord(settings.train_data, settings.seq_length))
    if m.train.engine_on(m.hardware.device) == "mindformers":
        # MindFormers starts from the shards each time: nothing of another run may be taken for its result
        clear_checkpoints(build.checkpoint)
        events.clear(build.output)
    drop_damaged_checkpoints(build)
    clear_compiled_strategies(build.compiled_strategy)
    # unsealed while training: a killed run is resumed, never taken as complete
    seal_path(build.checkpoint).unlink(missing_ok=True)
    seal_path(build.compiled_strategy).unlink(missing_ok=True)
    node, nodes = this_node(m), len(m.hardware.nodes)
    if node:
        raise UserError(f"this machine is node {node} of {nodes}: doit builds and trains from node 0",
                        hint=f"start {build.launch / f'node_{node}.sh'} here while node 0 runs `doit finetune`")
    script = build.launch / "node_0.sh"
    if nodes > 1:
        others = ", ".join(f"node_{k}.sh on {n.host}" for k, n in enumerate(m.hardware.nodes) if k)
        print(f"finetune: start {others} (in {build.launch}) now: msrun waits for them (or submit "
              f"{build.launch / 'slurm.sbatch'} instead of this)", file=sys.stderr)
    print(f"finetune: running {script} (node 0 of {nodes})", file=sys.stderr)
    run_node_script(script, build.msrun_log, workers_per_node(m), set_port=nodes == 1)
    checkpoints = write_seal(build.checkpoint)
    # what MindFormers compiled on Ascend (none on CPU) is an artifact of this finetune
    build.compiled_strategy.mkdir(parents=True, exist_ok=True)
    write_seal(build.compiled_strategy)
    merge_finetuned(ctx, checkpoints)
    if m.hardware.device == "cpu" and m.dataset.source == "builtin" and m.dataset.num_heldout:
        _evaluate(ctx, steps)


def finetune_strategies(build, world: int) -> tuple[list[Path], str]:
    """(files in rank order, which) the finetuned checkpoints were laid out by: the strategies MindFormers compiled
    during the finetune (output/strategy, Ascend), which are authoritative, when there are any, else the plan's."""
    if any(build.compiled_strategy.glob("*_rank_*.ckpt")):
        return collect_strategy_files(build.compiled_strategy, world), "compiled"
    return collect_strategy_files(build.strategy, world), "planned"


def merge_finetuned(ctx: Context, checkpoints: str) -> None:
    """Every rank's last checkpoint merged, by its strategy files, into one complete checkpoint of the weights
    (what convert_reversed, export and the held-out evaluation read), cached by the checkpoints' content."""
    build, world = ctx.build, ctx.manifest.parallel.world_size
    strategies, which = finetune_strategies(build, world)

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="qwenbuild-merge-") as staging:
            staging = Path(staging)
            (staging / "strategy").mkdir()
            for path in strategies:
                os.symlink(path.resolve(), staging / "strategy" / path.name)
            for rank in range(world):
                (staging / "ranks" / f"rank_{rank}").mkdir(parents=True)
                os.symlink(finished_checkpoint(build.output, rank).resolve(),
                           staging / "ranks" / f"rank_{rank}" / "last.ckpt")
            transform_ckpt(staging / "strategy", None, staging / "ranks", tmp, progress=None,
                           keep=lambda name: name == CONFIG_ENTRY or not is_beside_weights(name))

    keyed_dir(build, build.merged, {"checkpoints": checkpoints,
                                    "strategy": json_digest({p.name: content_digest(p) for p in strategies})},
              make, "merge")
    print(f"finetune: {world} rank checkpoint(s) merged into {build.merged_file} (by the {which} strategy files)",
          file=sys.stderr)


def _evaluate(ctx: Context, steps: int) -> None:
    build = ctx.build
    result = evaluate_heldout(build.merged_file, ctx.manifest.model.config, build.tokenizer,
                              build.heldout, metrics_path=build.metrics,
                              max_new_tokens=ctx.manifest.train.eval_max_new_tokens,
                              samples_path=build.output / "heldout_answers.jsonl")
    with events.EventLog(events.rank_dir(build.output, 0)) as log:
        log.scalars(steps, {events.HELDOUT_ACCURACY: result["heldout_accuracy"]})
    print(f"finetune: held-out accuracy {result['heldout_accuracy']:.1%} ({result['heldout_correct']}/"
          f"{result['heldout_total']})", file=sys.stderr)


def _machine(m) -> tuple[str, ...]:
    """Training on CPU computes with this machine's kernels, qwenbuild's engine with the fused ones too."""
    if m.hardware.device != "cpu":
        return ()
    return ("cpu", "fused_kernels") if m.train.engine_on("cpu") == "qwenbuild" else ("cpu",)


def specs(m, build) -> list[TaskSpec]:
    builtin = m.dataset.source == "builtin"
    return [
        TaskSpec("run_config", "run.json for qwenbuild's workers and the MindFormers YAML (run_qwen1_5.yaml)",
                 _run_config, keys=RUN_CONFIG_KEYS, inputs=[build.tokenizer],
                 outputs=[build.run_json, build.mindformers_yaml], packages=("mindformers",)),
        TaskSpec("finetune", "train on the MindRecord from the per-rank shards (the launch scripts, through msrun)",
                 _finetune, inputs=[build.run_json, build.mindrecord, build.transformed, build.launch, build.strategy]
                 + ([build.mindformers_yaml] if m.train.engine_on(m.hardware.device) == "mindformers" else [])
                 + ([build.dataset, build.tokenizer] if builtin else []),
                 keys=("train.eval_max_new_tokens", "train.engine", "hardware.device", "hardware.nodes",
                       "hardware.devices_per_node", "parallel.data_parallel", "parallel.model_parallel",
                       "parallel.pipeline_stage",
                       "dataset.source", "dataset.num_heldout") + MODEL_KEYS,
                 dir_outputs=[build.checkpoint, build.compiled_strategy, build.merged],
                 reports=[build.metrics, events.tensorboard_dir(build.output)],
                 packages=("mindspore", "numpy"), machine=_machine(m)),
    ]
