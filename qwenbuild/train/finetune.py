"""The training loop of one rank: build the network, resume or initialise, step through its data, save, report."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.model.lora import is_dropout_mask
from qwenbuild.parallel.rank_layout import ProcessLayout, process_layout, single_process
from qwenbuild.train import checkpoint, data, events
from qwenbuild.train.progress import Progress, plot_loss, write_metrics
from qwenbuild.train.schedule import schedule
from qwenbuild.train.settings import TrainSettings, check_parallel

logger = logging.getLogger(__name__)

METRICS = "metrics.json"
LOSS_PLOT = "loss.png"


def create_groups(layout: ProcessLayout) -> None:
    # the collectives load mindspore (seconds): imported only when this runs
    from qwenbuild.model.tensor_parallel import create_groups as create

    create(layout)


def start_mindspore(settings: TrainSettings, world_size: int) -> None:
    """Graph mode on the run's device, its CPU threads shared among the processes, and the run's seed."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target=settings.device_target)
    threads = settings.threads or max(1, (os.cpu_count() or 1) // world_size)
    if settings.device_target == "CPU":
        ms.set_context(runtime_num_threads=threads)
    ms.set_seed(settings.seed)
    np.random.seed(settings.seed)


def total_steps(settings: TrainSettings, num_rows: int) -> int:
    per_epoch = data.steps_per_epoch(num_rows, settings.global_batch_size)
    if per_epoch == 0:
        raise UserError(f"{settings.train_data} has {num_rows} rows, fewer than one global batch of "
                        f"{settings.global_batch_size} ({settings.rows_per_step} per data-parallel rank x "
                        f"{settings.data_parallel})",
                        hint="lower train.batch_size in qwen.toml (batch_size in run.json), or add training rows")
    return settings.steps or settings.epochs * per_epoch


def layout_of(settings: TrainSettings, process: int) -> ProcessLayout:
    """What this process holds: from the strategy files, or every parameter whole without them."""
    if not settings.strategy_dir:
        return single_process() if settings.processes == 1 else \
            ProcessLayout(process, settings.processes, 1, 0, (process,), {}, (), (process,),
                          tuple(range(settings.processes)))
    return process_layout(settings.strategy_dir, process, settings.processes, settings.pipeline_stage)


def build(settings: TrainSettings, layout: ProcessLayout | None = None):
    """(network, train step cell) for these settings and this process's part of the model."""
    # the network loads mindspore (seconds): imported only when this runs
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.model.tensor_parallel import ModelParallel
    from qwenbuild.train.optimizer import AdamW, decays
    from qwenbuild.train.step import TrainStep

    net = QwenForCausalLM(settings.model, ModelParallel(layout))
    if settings.lora:
        # the adapters load mindspore (seconds): imported only when LoRA trains
        from qwenbuild.model.adapters import add_adapters

        adapters = {p.name for p in add_adapters(net, settings.lora, settings.rows_per_step * settings.seq_length)}
        for param in net.get_parameters():
            param.requires_grad = param.name in adapters  # frozen: no gradient, no AdamW moments
        net.set_train(settings.lora.dropout > 0)
    params = net.trainable_params()
    optimizer = AdamW(params, settings.weight_decay, settings.beta1, settings.beta2, settings.eps,
                      decayed=[decays(p) for p in params])
    return net, TrainStep(net, optimizer, settings.grad_clip, layout)


def frozen_names(net) -> set[str]:
    """The network's weights LoRA leaves as they are (none for a full fine-tune)."""
    return {p.name for p in net.get_parameters() if not p.requires_grad and not is_dropout_mask(p.name)}


def saved(name: str, frozen: set[str]) -> bool:
    """Whether a run's checkpoints hold an entry: not a frozen weight (the shards hold those), nor a dropout
    mask (drawn again for every step)."""
    return name not in frozen and not is_dropout_mask(name)


def all_ranks(settings: TrainSettings) -> int:
    return settings.processes * settings.pipeline_stage


def start_state(settings: TrainSettings, net, train_step, layout: ProcessLayout, per_epoch: int,
                digest: str) -> tuple[int, dict]:
    """Restore the latest common checkpoint of the run with this digest (returns its step and history) or load
    the initial weights (step 0); LoRA's frozen weights always come from the initial ones, its adapters start as
    model/lora.py draws them. A process standing for several stages' ranks reads one file per rank."""
    frozen = frozen_names(net)
    step = checkpoint.resume_step(settings.output_dir, all_ranks(settings), settings.checkpoint_prefix, per_epoch,
                                  digest)
    if not step:
        for r in layout.ranks:
            checkpoint.clear_stale(settings.output_dir, r)
    if settings.init_checkpoint and (frozen or not step):
        paths = [checkpoint.init_checkpoint_file(settings.init_checkpoint, r) for r in layout.ranks]
        checkpoint.load_into(train_step, paths, sorted(frozen) or [p.name for p in train_step.weights])
    if step:
        paths = [checkpoint.saved_steps(settings.output_dir, r, settings.checkpoint_prefix, per_epoch)[step]
                 for r in layout.ranks]
        checkpoint.load_into(train_step, paths, [p.name for p in train_step.get_parameters() if saved(p.name, frozen)])
        history = checkpoint.read_meta(settings.output_dir, layout.ranks[0]).get("history", {})
        return step, {key: values[:step] for key, values in history.items()}
    if settings.lora:
        # the adapters load mindspore (seconds): imported only when LoRA trains
        from qwenbuild.model.adapters import init_adapters

        init_adapters(train_step.weights, settings.lora, settings.model, net.parallel, settings.seed)
    return 0, {}


def save_choice(layout: ProcessLayout, stage: int, frozen: set[str]):
    """Which entries one stage's rank saves: its stage's (layout.stage_filter), never a frozen weight, which the
    shards hold; None keeps every entry."""
    in_stage = layout.stage_filter(stage)
    if not frozen:
        return in_stage
    return lambda name: saved(name, frozen) and (in_stage is None or in_stage(name))


def finetune(settings: TrainSettings, process: int = 0, processes: int = 1, progress: Progress | None = None) -> dict:
    """Train one process to the end (resuming from the last checkpoint of the same settings); returns the metrics.

    Process 0 writes <output_dir>/metrics.json and loss.png; every rank writes its checkpoints under
    <output_dir>/checkpoint/rank_N/ (a process running several pipeline stages writes one per stage's rank).
    Under msrun, call communication init() before this.
    """
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    from qwenbuild.model.adapters import set_dropout_masks

    check_parallel(settings)
    if processes != settings.processes:
        raise UserError(f"run.json says data_parallel = {settings.data_parallel} x model_parallel = "
                        f"{settings.model_parallel}, {settings.processes} processes, but {processes} worker "
                        "process(es) started",
                        hint="start data_parallel x model_parallel msrun workers")
    began = time.monotonic()
    start_mindspore(settings, processes)
    layout = layout_of(settings, process)
    if processes > 1:
        # the network's collectives name these groups
        create_groups(layout)
    num_rows = data.check_mindrecord(settings.train_data, settings.seq_length)
    per_epoch = data.steps_per_epoch(num_rows, settings.global_batch_size)
    total = total_steps(settings, num_rows)
    lrs = schedule(total, settings.learning_rate, settings.warmup_ratio, settings.lr_end)
    net, train_step = build(settings, layout)
    if layout.pipeline_stage > 1 and process == 0:
        logger.info(f"pipeline_stage={layout.pipeline_stage}: each process runs the layers of every stage in sequence "
                    "(CPU has no send/receive between processes); checkpoints are written per stage's rank")
    # hashes the training data and initial weights: once per run, not at every save
    digest = settings.result_digest()
    first, history = start_state(settings, net, train_step, layout, per_epoch, digest)
    frozen = frozen_names(net)
    # step times are this process's only: they never enter a checkpoint, whose bytes must not depend on timing
    losses, norms, times = history.get("loss", []), history.get("grad_norm", []), []
    rows = data.rank_rows_by_epoch(num_rows, settings.global_batch_size, settings.seed, first, total,
                                   layout.dp_index, settings.rows_per_step)
    if process == 0 and progress is None:
        progress = Progress(total, first)
    if progress and first:
        progress.line(f"resuming from step {first}/{total} ({settings.output_dir}/checkpoint)")
    log = None
    if process == 0:
        if not first:
            events.clear(settings.output_dir)
        # the curves in TensorBoard, rank 0 as MindFormers writes them (the loss is the data-parallel mean)
        log = events.EventLog(events.rank_dir(settings.output_dir, 0))
    tokens_per_step = settings.global_batch_size * settings.seq_length
    step = first
    for input_ids, target_ids in data.batches(settings.train_data, rows, settings.rows_per_step):
        t0 = time.monotonic()
        if settings.lora and settings.lora.dropout:
            set_dropout_masks(net, settings.seed, step)
        loss, norm = train_step(ms.Tensor(input_ids), ms.Tensor(target_ids), ms.Tensor(np.float32(lrs[step])))
        loss, norm = float(loss.asnumpy()), float(norm.asnumpy())
        times.append(time.monotonic() - t0)
        losses.append(loss)
        norms.append(norm)
        step += 1
        if progress:
            progress.step(step, loss, lrs[step - 1], tokens_per_step, times[-1])
        if log:
            log.scalars(step, {events.LOSS: loss, events.LEARNING_RATE: lrs[step - 1], events.GRAD_NORM: norm,
                               events.TOKENS_PER_S: tokens_per_step / max(times[-1], 1e-9)})
        if step % settings.save_steps == 0 or step == total:
            for stage, stage_rank in enumerate(layout.ranks):
                checkpoint.save(train_step, settings.output_dir, stage_rank, step, per_epoch,
                                settings.checkpoint_prefix, digest, settings.keep_checkpoint_max,
                                {"history": {"loss": losses, "grad_norm": norms}}, settings.model.to_hf_dict(),
                                save_choice(layout, stage, frozen), settings.lora)
    if progress:
        progress.close()
    if log:
        log.close()
    metrics = _metrics(settings, losses, lrs, norms, times, first, total, time.monotonic() - began, per_epoch)
    if process == 0:
        write_metrics(Path(settings.output_dir) / METRICS, metrics, merge=False)
        plot_loss(Path(settings.output_dir) / LOSS_PLOT, losses, lrs[:len(losses)])
        logger.info(f"trained {total} steps in {metrics['wall_s']:.1f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                    f"{metrics['tokens_per_s']:.0f} tokens/s over {processes} worker(s); "
                    f"checkpoint {metrics['checkpoint']}")
    return metrics


def final_checkpoint(settings: TrainSettings, rank: int, num_rows: int) -> Path:
    """Path of the last checkpoint a finished run leaves for `rank`."""
    per_epoch = data.steps_per_epoch(num_rows, settings.global_batch_size)
    name = checkpoint.file_name(settings.checkpoint_prefix, rank, total_steps(settings, num_rows), per_epoch)
    return checkpoint.rank_dir(settings.output_dir, rank) / name


def _metrics(settings, losses, lrs, norms, times, first, total, wall, per_epoch) -> dict:
    # the first step of a process compiles the graph: keep it out of the throughput
    steady = times[1:] or times
    tokens_per_step = settings.global_batch_size * settings.seq_length
    name = checkpoint.file_name(settings.checkpoint_prefix, 0, total, per_epoch)
    return {
        "loss": losses,
        "learning_rate": lrs[:len(losses)],
        "grad_norm": norms,
        "tokens_per_s": tokens_per_step * len(steady) / max(sum(steady), 1e-9),
        "wall_s": wall,
        "compile_s": times[0] if times else 0.0,
        "steps": total,
        "resumed_from_step": first,
        "global_batch_size": settings.global_batch_size,
        "seq_length": settings.seq_length,
        "data_parallel": settings.data_parallel,
        "final_loss": losses[-1] if losses else None,
        "checkpoint": str(checkpoint.rank_dir(settings.output_dir, 0) / name),
    }
