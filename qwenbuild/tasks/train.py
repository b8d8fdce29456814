"""Tasks of training: the run configuration (run.json, MindFormers YAML) and finetune itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

from qwenbuild.data.mindrecord import shard_files
from qwenbuild.digests import content_digest, json_digest
from qwenbuild.errors import UserError
from qwenbuild.lock import Lock, check_artifact, check_sealed
from qwenbuild.model.lora import LoraConfig, is_adapter
from qwenbuild.model.params import CONFIG_ENTRY, LORA_ENTRY, is_beside_weights
from qwenbuild.parallel.reshard import transform_ckpt
from qwenbuild.parallel.strategy import collect_strategy_files
from qwenbuild.store import atomic_path, read_seal, refuse_in_the_way, remove, seal_path, write_seal
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.distributed import in_build, keyed_dir, lora_keys, workers_per_node
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.tokenizer.files import MERGES_FILE, VOCAB_FILE, pad_token_id, read_vocab
from qwenbuild.train import events
from qwenbuild.train.checkpoint import finished_checkpoint, read_meta
from qwenbuild.train.data import check_mindrecord
from qwenbuild.train.evaluate import evaluate_heldout
from qwenbuild.train.finetune import total_steps
from qwenbuild.train.mindformers_yaml import RunYaml, default_target, write_yaml
from qwenbuild.train.msrun import run_node_script
from qwenbuild.train.progress import write_metrics
from qwenbuild.train.settings import SCHEMA_KEYS, TrainSettings, read_run_json, write_run_json
from qwenbuild.weights.lora import merge_lora, read_adapters, write_peft_adapter

logger = logging.getLogger(__name__)

# the rest of the parallel plan, which only MindFormers' YAML spells out
YAML_KEYS = ("parallel.micro_batch_num", "parallel.vocab_emb_dp", "parallel.use_seq_parallel", "parallel.recompute",
             "parallel.gradient_aggregation_group", "parallel.offset")
RUN_CONFIG_KEYS = MODEL_KEYS + tuple(SCHEMA_KEYS.values()) + ("dataset.file_partition", "hardware.device",
                                                              "hardware.device_memory_gb") + YAML_KEYS


def run_settings(m, build, lora: LoraConfig | None = None, start: Path | None = None) -> TrainSettings:
    """run.json's settings: the qwen.toml keys of SCHEMA_KEYS by name, plus the build's paths (relative to the build
    dir, where run.json lies and the launch scripts run, or to `start`, where another script runs) and the adapters
    to train (None: every weight)."""
    # MindDataset finds the other shards of a MindRecord from any one of them
    train_data = shard_files(build.mindrecord_file, m.dataset.file_partition)[0]
    return TrainSettings(model=m.model.config, train_data=in_build(build, train_data, start),
                         output_dir=in_build(build, build.output, start),
                         init_checkpoint=in_build(build, build.transformed, start),
                         strategy_dir=in_build(build, build.strategy, start),
                         device_target="Ascend" if m.hardware.device == "ascend" else "CPU", lora=lora,
                         **{name: m.value(key) for name, key in SCHEMA_KEYS.items()})


def run_yaml(m, build, settings: TrainSettings, start: Path | None = None, **plan) -> RunYaml:
    """The YAML's view of a run: its settings, the rest of its parallel plan and the build's tokenizer files (named
    relative to the build dir, or to `start`, where the script that reads the YAML runs)."""
    pad = pad_token_id(read_vocab(build.tokenizer / VOCAB_FILE))
    return RunYaml(settings, vocab_file=in_build(build, build.tokenizer / VOCAB_FILE, start),
                   merges_file=in_build(build, build.tokenizer / MERGES_FILE, start), pad_token_id=pad,
                   eos_token_id=pad, device_memory_gb=m.hardware.device_memory_gb, **plan)


def lora_config(m) -> LoraConfig | None:
    return m.train.lora_config if m.value("train.method") == "lora" else None


def _run_config(ctx: Context) -> None:
    m, build, par = ctx.manifest, ctx.build, ctx.manifest.parallel
    settings = run_settings(m, build, lora_config(m))
    write_run_json(build.run_json, settings)
    run = run_yaml(m, build, settings, micro_batch_num=par.micro_batch_num, vocab_emb_dp=par.vocab_emb_dp,
                   use_seq_parallel=par.use_seq_parallel, recompute=par.recompute,
                   gradient_aggregation_group=par.gradient_aggregation_group, offset=par.stage_offset)
    target = default_target(settings)
    write_yaml(build.mindformers_yaml, run, target)
    logger.info(f"run_config: {build.run_json.name} and {build.mindformers_yaml.name} ({target}) -> {build.root}")


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
    """The strategy files MindFormers compiled in an earlier finetune: this run's must not be mixed with them. What
    else the directory holds was not written there by a finetune, and would be sealed into its artifact: refused,
    named (store's one rule of what an output may replace)."""
    for path in directory.glob("*_rank_*.ckpt") if directory.is_dir() and not directory.is_symlink() else ():
        path.unlink()
    refuse_in_the_way(directory, directory=True)


def drop_damaged_checkpoints(build) -> None:
    """Delete files of a finished run that no longer match its seal: resuming must never start from damaged bytes."""
    members = read_seal(build.checkpoint)
    if members is None:
        return
    stats = Lock(build.lock).read_stats()
    for rel, digest in members.items():
        path = build.checkpoint / rel
        if path.is_file() and check_artifact(path, {"kind": "file", "digest": digest}, stats):
            logger.warning(f"finetune: {path} changed since it was saved; training resumes without it")
            path.unlink()


def use_slot(build, method: str) -> Path:
    """output/checkpoint links to output/checkpoint-<method>, where that method's last run trains: switching
    method keeps the other one's run, to be reused when its inputs come back."""
    link, slot = build.checkpoint, build.checkpoint.with_name(f"checkpoint-{method}")
    if link.is_dir() and not link.is_symlink():
        # a build dir from before the slots held a full fine-tune there
        remove(link.with_name("checkpoint-full"))
        os.replace(link, link.with_name("checkpoint-full"))
    slot.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == slot.name):
        with atomic_path(link, link=True) as tmp:  # replaces only its own link to the other slot
            os.symlink(slot.name, tmp)
    return slot


def run_inputs(ctx: Context, engine: str) -> dict:
    """What decides a run's result: the engine and the digests of run.json, the data, the shards, the strategy
    files and the launch scripts (and the YAML MindFormers reads)."""
    build, lock = ctx.build, Lock(ctx.build.lock)
    paths = [build.run_json, build.mindrecord, build.transformed, build.strategy, build.launch] + \
        ([build.mindformers_yaml] if engine == "mindformers" else [])
    return {"engine": engine, "inputs": {p.relative_to(build.root).as_posix(): lock.digest_of(p, build.root)
                                         for p in paths}}


def inputs_record(slot: Path) -> Path:
    """Beside a slot, the inputs its run trained from (not inside it: they name this build dir's files, which a
    rebuild elsewhere names differently, and the checkpoints must compare equal)."""
    return slot.with_name(f"{slot.name}.inputs.json")


def finished_run(slot: Path, inputs: dict, build) -> bool:
    """True when the slot holds a complete run of these inputs and output/strategy still holds the strategies
    MindFormers compiled in that run (on Ascend the merge lays the checkpoints out by them; none on CPU)."""
    try:
        recorded = json.loads(inputs_record(slot).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return False
    stats = Lock(build.lock).read_stats()
    compiled = read_seal(build.compiled_strategy)
    return (recorded.get("inputs") == inputs and compiled is not None
            and recorded.get("compiled_strategy") == json_digest(compiled)
            and check_sealed(build.compiled_strategy, stats) is None and check_sealed(slot, stats) is None)


def _finetune(ctx: Context) -> None:
    m, build = ctx.manifest, ctx.build
    settings = read_run_json(build.run_json)  # refuses model/pipeline parallel on CPU with the reason
    # too few rows for one global batch is found here, before msrun starts workers that compile the graph
    steps = total_steps(settings, check_mindrecord(settings.train_data, settings.seq_length))
    engine = m.train.engine_on(m.hardware.device)
    method = "lora" if settings.lora else "full"
    slot, inputs = use_slot(build, method), run_inputs(ctx, engine)
    if finished_run(slot, inputs, build):
        logger.info(f"finetune: reusing the finished {method} fine-tune in {slot} (same inputs)")
        history = read_meta(build.output, 0).get("history", {})
        write_metrics(build.metrics, {**history, "reused": slot.name}, merge=False)
        # the event files are those of the run in between, of the other method
        events.clear(build.output)
        checkpoints = json_digest(read_seal(slot))
    else:
        checkpoints = _train(ctx, engine, inputs)
    merge_finetuned(ctx, checkpoints, settings.lora)
    if m.hardware.device == "cpu" and m.dataset.source == "builtin" and m.dataset.num_heldout:
        _evaluate(ctx, steps)


def _train(ctx: Context, engine: str, inputs: dict) -> str:
    """Run node 0's launch script (the other nodes' are started by hand or by Slurm); the sealed checkpoints'
    digest."""
    m, build = ctx.manifest, ctx.build
    if engine == "mindformers":
        # MindFormers starts from the shards each time: nothing of another run may be taken for its result
        clear_checkpoints(build.checkpoint)
        events.clear(build.output)
    drop_damaged_checkpoints(build)
    clear_compiled_strategies(build.compiled_strategy)
    # unsealed while training: a killed run is resumed, never taken as complete
    seal_path(build.checkpoint).unlink(missing_ok=True)
    inputs_record(build.checkpoint.resolve()).unlink(missing_ok=True)
    seal_path(build.compiled_strategy).unlink(missing_ok=True)
    node, nodes = this_node(m), len(m.hardware.nodes)
    if node:
        raise UserError(f"this machine is node {node} of {nodes}: doit builds and trains from node 0",
                        hint=f"start {build.launch / f'node_{node}.sh'} here while node 0 runs `doit finetune`")
    script = build.launch / "node_0.sh"
    if nodes > 1:
        others = ", ".join(f"node_{k}.sh on {n.host}" for k, n in enumerate(m.hardware.nodes) if k)
        logger.warning(f"finetune: start {others} (in {build.launch}) now: msrun waits for them (or submit "
                       f"{build.launch / 'slurm.sbatch'} instead of this)")
    logger.info(f"finetune: running {script} (node 0 of {nodes})")
    run_node_script(script, build.msrun_log, workers_per_node(m), set_port=nodes == 1)
    checkpoints = write_seal(build.checkpoint)
    # what MindFormers compiled on Ascend (none on CPU) is an artifact of this finetune
    build.compiled_strategy.mkdir(parents=True, exist_ok=True)
    compiled = write_seal(build.compiled_strategy)
    with atomic_path(inputs_record(build.checkpoint.resolve())) as tmp:
        tmp.write_text(json.dumps({"inputs": inputs, "compiled_strategy": compiled}, indent=1, sort_keys=True)
                       + "\n", encoding="utf-8")
    return checkpoints


def finetune_strategies(build, world: int) -> tuple[list[Path], str]:
    """(files in rank order, which) the finetuned checkpoints were laid out by: the strategies MindFormers compiled
    during the finetune (output/strategy, Ascend), which are authoritative, when there are any, else the plan's."""
    if any(build.compiled_strategy.glob("*_rank_*.ckpt")):
        return collect_strategy_files(build.compiled_strategy, world), "compiled"
    return collect_strategy_files(build.strategy, world), "planned"


def _stage_run(build, world: int, strategies: list[Path], staging: Path) -> tuple[Path, Path]:
    """(strategy dir, checkpoint dir) in staging as transform_ckpt reads a layout: links to the strategy files and
    to every rank's last checkpoint as rank_N/last.ckpt."""
    (staging / "strategy").mkdir(parents=True)
    for path in strategies:
        os.symlink(path.resolve(), staging / "strategy" / path.name)
    for rank in range(world):
        (staging / "ranks" / f"rank_{rank}").mkdir(parents=True)
        os.symlink(finished_checkpoint(build.output, rank).resolve(), staging / "ranks" / f"rank_{rank}" / "last.ckpt")
    return staging / "strategy", staging / "ranks"


def complete_adapters(build, world: int, lora: LoraConfig, cfg, work: Path) -> dict:
    """The adapters of every rank's last checkpoint joined, by the finetune's strategy files, into whole tensors."""
    strategy, ranks = _stage_run(build, world, finetune_strategies(build, world)[0], work)
    transform_ckpt(strategy, None, ranks, work / "adapters", progress=None,
                   keep=lambda name: name == LORA_ENTRY or is_adapter(name))
    return read_adapters(work / "adapters" / "rank_0" / "checkpoint_0.ckpt", lora, cfg)


def merge_finetuned(ctx: Context, checkpoints: str, lora: LoraConfig | None = None) -> None:
    """Every rank's last checkpoint merged, by its strategy files, into one complete checkpoint of the weights
    (what convert_reversed, export and the held-out evaluation read), cached by the checkpoints' content. After
    LoRA, the adapters are joined and added to the converted weights: W + alpha / rank * B A where they train,
    the converted bytes elsewhere."""
    build, world = ctx.build, ctx.manifest.parallel.world_size
    strategies, which = finetune_strategies(build, world)

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="qwenbuild-merge-") as staging:
            if lora is None:
                strategy, ranks = _stage_run(build, world, strategies, Path(staging))
                transform_ckpt(strategy, None, ranks, tmp, progress=None,
                               keep=lambda name: name == CONFIG_ENTRY or not is_beside_weights(name))
                return
            adapters = complete_adapters(build, world, lora, ctx.manifest.model.config, Path(staging))
            (tmp / "rank_0").mkdir()
            merge_lora(build.converted, adapters, lora, tmp / "rank_0" / "checkpoint_0.ckpt",
                       progress=lambda line: logger.info(f"finetune: {line}"))
            write_seal(tmp)

    sources = {"checkpoints": checkpoints, "strategy": json_digest({p.name: content_digest(p) for p in strategies})}
    if lora is not None:
        sources.update(base=Lock(build.lock).digest_of(build.converted, build.root), lora=dataclasses.asdict(lora))
    keyed_dir(build, build.merged, sources, make, "merge")
    logger.info(f"finetune: {world} rank checkpoint(s) merged into {build.merged_file} (by the {which} strategy files)")


def _adapter(ctx: Context) -> None:
    m, build = ctx.manifest, ctx.build
    lora = lora_config(m)
    if lora is None:
        raise UserError("train.method is \"full\": every weight trains, so there is no adapter to write",
                        hint="set train.method = \"lora\" (qwenbuild set train.method=lora), then doit adapter")
    # the base model the adapter goes onto, as PEFT records it
    base = m.path_of("model.hf_dir") if m.value("model.init") == "hf" else build.init_weights
    with ctx.output_dir(build.adapter) as tmp, tempfile.TemporaryDirectory(prefix="qwenbuild-adapter-") as work:
        adapters = complete_adapters(build, m.parallel.world_size, lora, m.model.config, Path(work))
        write_peft_adapter(adapters, lora, str(base), tmp)
    logger.info(f"adapter: {len(adapters) // 2} adapter(s) of rank {lora.rank} on {', '.join(lora.targets)} (scale "
                f"{lora.alpha:g} / {lora.rank} = {lora.scale:g}) in PEFT's format -> {build.adapter}")


def _evaluate(ctx: Context, steps: int) -> None:
    build = ctx.build
    result = evaluate_heldout(build.merged_file, ctx.manifest.model.config, build.tokenizer,
                              build.heldout, metrics_path=build.metrics,
                              max_new_tokens=ctx.manifest.train.eval_max_new_tokens,
                              samples_path=build.output / "heldout_answers.jsonl")
    with events.EventLog(events.rank_dir(build.output, 0)) as log:
        log.scalars(steps, {events.HELDOUT_ACCURACY: result["heldout_accuracy"]})
    logger.info(f"finetune: held-out accuracy {result['heldout_accuracy']:.1%} ({result['heldout_correct']}/"
                f"{result['heldout_total']})")


def _machine(m) -> tuple[str, ...]:
    """Training on CPU computes with this machine's kernels, qwenbuild's engine with the fused ones too."""
    if m.hardware.device != "cpu":
        return ()
    return ("cpu", "fused_kernels") if m.train.engine_on("cpu") == "qwenbuild" else ("cpu",)


def specs(m, build) -> list[TaskSpec]:
    builtin = m.dataset.source == "builtin"
    lora = m.train.method == "lora"
    return [
        TaskSpec("run_config", "run.json for qwenbuild's workers and the MindFormers YAML (run_qwen1_5.yaml)",
                 _run_config, keys=RUN_CONFIG_KEYS + lora_keys(m, "train.lora"), inputs=[build.tokenizer],
                 outputs=[build.run_json, build.mindformers_yaml], packages=("mindformers",)),
        TaskSpec("finetune", "train on the MindRecord from the per-rank shards (the launch scripts, through msrun)",
                 # the script it runs, not the whole launch dir: slurm.sbatch names the build dir's path, which a
                 # copied project changes without changing what trains
                 _finetune, inputs=[build.run_json, build.mindrecord, build.transformed, build.launch / "node_0.sh",
                                    build.strategy]
                 + ([build.mindformers_yaml] if m.train.engine_on(m.hardware.device) == "mindformers" else [])
                 + ([build.converted] if lora else [])
                 + ([build.dataset, build.tokenizer] if builtin else []),
                 keys=("train.eval_max_new_tokens", "train.engine", "hardware.device", "hardware.nodes",
                       "hardware.devices_per_node", "parallel.data_parallel", "parallel.model_parallel",
                       "parallel.pipeline_stage",
                       "dataset.source", "dataset.num_heldout") + MODEL_KEYS,
                 dir_outputs=[build.checkpoint, build.compiled_strategy, build.merged],
                 reports=[build.metrics, events.tensorboard_dir(build.output)],
                 packages=("mindspore", "numpy"), machine=_machine(m)),
        TaskSpec("adapter", "the trained LoRA adapters in PEFT's format (adapter_config.json, "
                            "adapter_model.safetensors)", _adapter,
                 keys=MODEL_KEYS + lora_keys(m, "train.lora") + ("model.hf_dir", "model.init",
                                                                 "parallel.data_parallel", "parallel.model_parallel",
                                                                 "parallel.pipeline_stage"),
                 inputs=[build.checkpoint, build.compiled_strategy, build.strategy], dir_outputs=[build.adapter],
                 packages=("mindspore", "numpy")),
    ]
