"""The training loop of one rank: build the network, resume or initialise, step through its data, save, report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.model.params import parameter_shapes
from qwenbuild.train import checkpoint, data
from qwenbuild.train.progress import Progress, plot_loss, write_metrics
from qwenbuild.train.schedule import schedule
from qwenbuild.train.settings import TrainSettings, check_parallel

METRICS = "metrics.json"
LOSS_PLOT = "loss.png"


def set_context(settings: TrainSettings, world_size: int) -> None:
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
                        f"{settings.global_batch_size} ({settings.batch_size} per rank x {settings.workers} workers)",
                        hint="lower train.batch_size in qwen.toml (batch_size in run.json), or add training rows")
    return settings.steps or settings.epochs * per_epoch


def build(settings: TrainSettings):
    """(network, train step cell) for these settings."""
    # the network loads mindspore (seconds): imported only when this runs
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.train.optimizer import AdamW
    from qwenbuild.train.step import TrainStep

    net = QwenForCausalLM(settings.model)
    optimizer = AdamW(net.trainable_params(), settings.weight_decay, settings.beta1, settings.beta2, settings.eps)
    return net, TrainStep(net, optimizer, settings.grad_clip, settings.workers)


def start_state(settings: TrainSettings, train_step, rank: int, per_epoch: int, digest: str) -> tuple[int, dict]:
    """Restore the latest common checkpoint of the run with this digest (returns its step and history) or load
    the initial weights (step 0)."""
    step = checkpoint.resume_step(settings.output_dir, settings.workers, settings.checkpoint_prefix, per_epoch,
                                  digest)
    if step:
        path = checkpoint.saved_steps(settings.output_dir, rank, settings.checkpoint_prefix, per_epoch)[step]
        checkpoint.load_into(train_step, path, [p.name for p in train_step.get_parameters()])
        history = checkpoint.read_meta(settings.output_dir, rank).get("history", {})
        return step, {key: values[:step] for key, values in history.items()}
    checkpoint.clear_stale(settings.output_dir, rank)
    if settings.init_checkpoint:
        path = checkpoint.init_checkpoint_file(settings.init_checkpoint, rank)
        checkpoint.load_into(train_step, path, list(parameter_shapes(settings.model)))
    return 0, {}


def finetune(settings: TrainSettings, rank: int = 0, world_size: int = 1, progress: Progress | None = None) -> dict:
    """Train one rank to the end (resuming from the last checkpoint of the same settings); returns the metrics.

    Rank 0 writes <output_dir>/metrics.json and loss.png; every rank writes its checkpoints under
    <output_dir>/checkpoint/rank_N/. Under msrun, call communication init() before this.
    """
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    check_parallel(settings)
    if world_size != settings.workers:
        raise UserError(f"run.json says workers = {settings.workers} but {world_size} worker process(es) started",
                        hint="start as many msrun workers as `workers`")
    began = time.monotonic()
    set_context(settings, world_size)
    num_rows = data.check_mindrecord(settings.train_data, settings.seq_length)
    per_epoch = data.steps_per_epoch(num_rows, settings.global_batch_size)
    total = total_steps(settings, num_rows)
    lrs = schedule(total, settings.learning_rate, settings.warmup_ratio, settings.lr_end)
    net, train_step = build(settings)
    # hashes the training data and initial weights: once per run, not at every save
    digest = settings.result_digest()
    first, history = start_state(settings, train_step, rank, per_epoch, digest)
    # step times are this process's only: they never enter a checkpoint, whose bytes must not depend on timing
    losses, norms, times = history.get("loss", []), history.get("grad_norm", []), []
    rows = data.rank_rows_by_epoch(num_rows, settings.global_batch_size, settings.seed, first, total, rank,
                              settings.batch_size)
    if rank == 0 and progress is None:
        progress = Progress(total, first)
    if progress and first:
        progress.line(f"resuming from step {first}/{total} ({settings.output_dir}/checkpoint)")
    tokens_per_step = settings.global_batch_size * settings.seq_length
    step = first
    for input_ids, target_ids in data.batches(settings.train_data, rows, settings.batch_size):
        t0 = time.monotonic()
        loss, norm = train_step(ms.Tensor(input_ids), ms.Tensor(target_ids), ms.Tensor(np.float32(lrs[step])))
        loss, norm = float(loss.asnumpy()), float(norm.asnumpy())
        times.append(time.monotonic() - t0)
        losses.append(loss)
        norms.append(norm)
        step += 1
        if progress:
            progress.step(step, loss, lrs[step - 1], tokens_per_step, times[-1])
        if step % settings.save_steps == 0 or step == total:
            checkpoint.save(train_step, settings.output_dir, rank, step, per_epoch, settings.checkpoint_prefix,
                            digest, settings.keep_checkpoint_max,
                            {"history": {"loss": losses, "grad_norm": norms}}, settings.model.to_hf_dict())
    if progress:
        progress.close()
    metrics = _metrics(settings, losses, lrs, norms, times, first, total, time.monotonic() - began, per_epoch)
    if rank == 0:
        write_metrics(Path(settings.output_dir) / METRICS, metrics, merge=False)
        plot_loss(Path(settings.output_dir) / LOSS_PLOT, losses, lrs[:len(losses)])
        print(f"trained {total} steps in {metrics['wall_s']:.1f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{metrics['tokens_per_s']:.0f} tokens/s over {world_size} worker(s); "
              f"checkpoint {metrics['checkpoint']}", flush=True)
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
        "workers": settings.workers,
        "final_loss": losses[-1] if losses else None,
        "checkpoint": str(checkpoint.rank_dir(settings.output_dir, 0) / name),
    }
