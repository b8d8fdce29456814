"""LoRA training: qwenbuild's LoRA against qwenbuild's full fine-tuning and against peft + transformers + torch, on
the identical model, rows, steps and adapters.

Each side runs in a process of its own, so its peak RSS is its own; the three take turns every --block steps (so a
neighbour's burst on a shared machine slows all alike), or with --block 0 run one after the other (a 0.5B-shaped
full fine-tune alone needs about 8 GB). All three start from the same seeded Hugging Face checkpoint and read the
same rows in the same order with the same AdamW (betas 0.9/0.95, eps 1e-8, decoupled decay), cosine schedule and
clipping; both LoRA sides start from the same adapters (A as qwenbuild draws it, B zero) on the same targets, with
the same rank, alpha and dropout (default 0, so their loss curves can be compared step by step). The first step of
each (graph compile, allocation) is not timed. Peak RSS is the process's high-water mark (ru_maxrss), and beside it
what it grew by from just before the model was built (interpreter, libraries and data excluded).

    .venv/bin/python bench/bench_lora.py [--steps 40] [--batch 16] [--seq 64] [--rank 8] [--targets q_proj,v_proj]
    .venv/bin/python bench/bench_lora.py --shape 0.5b --steps 6 --batch 2 --seq 64 --block 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from bench_train import qwenbuild_side
from scratch import scratch_directory
from torch_train import load_qwen2, torch_steps
from turns import current_rss_mb, measure, options_of, serve, tokens_per_s

SIDES = ("qwenbuild-lora", "qwenbuild-full", "peft")


def run_settings(args, work: Path):
    from bench_train import default_model, half_billion_model

    from qwenbuild.model.lora import LoraConfig
    from qwenbuild.train.settings import TrainSettings

    cfg = default_model(args.vocab, args.seq) if args.shape == "tiny" else half_billion_model(args.seq)
    lora = LoraConfig(args.rank, args.alpha, args.dropout, tuple(args.targets.split(",")))
    return TrainSettings(model=cfg, train_data=str(work / "train.mindrecord"), output_dir=str(work / "out"),
                         seq_length=args.seq, batch_size=args.batch, learning_rate=args.lr, warmup_ratio=0.05,
                         steps=args.steps, save_steps=args.steps, init_checkpoint=str(work / "init.ckpt"),
                         threads=args.threads, lora=lora)


def peft_side(hf_dir: Path, settings, rows_by_epoch, lrs):
    """peft's LoRA on transformers' Qwen2 in torch, its lora_A set to the adapters qwenbuild draws."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qwenbuild.model import lora as names

    lora = settings.lora
    model = get_peft_model(load_qwen2(hf_dir, settings),
                           LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM"))
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in names.adapter_shapes(settings.model, lora).items():
            key = names.peft_key(name).replace(".weight", ".default.weight")
            state[key].copy_(torch.from_numpy(names.initial_value(name, shape, settings.seed)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch_steps(model, [{"params": trainable, "weight_decay": settings.weight_decay}], settings,
                       rows_by_epoch, lrs)


def run_side(args) -> int:
    """One side in this process, driven over stdin (turns.serve)."""
    import dataclasses

    from qwenbuild.model.lora import trainable_parameters
    from qwenbuild.train import data
    from qwenbuild.train.schedule import schedule

    work = Path(args.work)
    os.chdir(work)  # MindSpore writes logs into the working directory
    settings = run_settings(args, work)
    if args.side == "qwenbuild-full":
        settings = dataclasses.replace(settings, lora=None)
    rows = data.check_mindrecord(settings.train_data, args.seq)
    rows_by_epoch = data.rank_rows_by_epoch(rows, args.batch, settings.seed, 0, args.steps, 0, args.batch)
    lrs = schedule(args.steps, args.lr, settings.warmup_ratio)
    before = current_rss_mb()
    steps = peft_side(work / "hf", settings, rows_by_epoch, lrs) if args.side == "peft" else \
        qwenbuild_side(settings, rows_by_epoch, lrs)
    return serve(steps, {"rss_before_mb": before, "trainable": trainable_parameters(settings.model, settings.lora)})


def prepare(args, work: Path) -> None:
    from bench_train import synthetic_mindrecord

    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model

    os.chdir(work)
    settings = run_settings(args, work)
    synthetic_mindrecord(work / "train.mindrecord", 2000, args.seq, settings.model.vocab_size)
    write_random_hf_model(settings.model, 0, work / "hf")
    convert_weight(work / "hf", work / "init.ckpt", progress=None)


def report(args, runs: list[dict[str, dict]]) -> None:
    tokens = args.batch * args.seq
    speed = {s: [tokens_per_s(r[s]["seconds"], tokens) for r in runs] for s in SIDES}
    peak = {s: statistics.median(r[s]["peak_rss_mb"] for r in runs) for s in SIDES}
    grown = {s: statistics.median(r[s]["peak_rss_mb"] - r[s]["rss_before_mb"] for r in runs) for s in SIDES}
    med = {s: statistics.median(v) for s, v in speed.items()}
    print(f"{'':16s} {'tokens/s':>9s} {'peak RSS MB':>12s} {'of it training':>15s} {'trainable':>10s}  runs (tokens/s)")
    for s in SIDES:
        print(f"{s:16s} {med[s]:9.0f} {peak[s]:12.0f} {grown[s]:15.0f} {runs[0][s]['trainable']:10d}  "
              f"{', '.join(f'{v:.0f}' for v in speed[s])}")
    for other, label in (("qwenbuild-full", "full fine-tuning"), ("peft", "peft + torch")):
        ratios = [a / b for a, b in zip(speed["qwenbuild-lora"], speed[other])]
        print(f"qwenbuild LoRA / {label + ':':17s} {statistics.median(ratios):.2f}x tokens/s (runs: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}), {peak['qwenbuild-lora'] / peak[other]:.2f}x peak RSS, "
              f"{grown['qwenbuild-lora'] / grown[other]:.2f}x of it training")
    ours, theirs = np.array(runs[0]["qwenbuild-lora"]["loss"]), np.array(runs[0]["peft"]["loss"])
    print(f"LoRA losses {ours[0]:.4f} -> {ours[-1]:.4f} (peft {theirs[0]:.4f} -> {theirs[-1]:.4f}); largest per-step "
          f"gap {np.max(np.abs(ours - theirs)):.2e}" + ("" if args.dropout == 0 else " (dropout masks differ)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the three sides (medians are printed)")
    parser.add_argument("--block", type=int, default=5, help="steps each side runs before the next one's turn; 0: "
                        "each side to its end, one after the other")
    parser.add_argument("--shape", choices=("tiny", "0.5b"), default="tiny",
                        help="tiny (default: hidden 128, 4 layers, --vocab) or Qwen1.5-0.5B's shape (few --steps, "
                             "small --batch and --seq)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    with scratch_directory("bench_lora_") as work:
        prepare(args, work)
        print(f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, {args.threads} threads, rank {args.rank} "
              f"on {args.targets}, alpha {args.alpha:g}, dropout {args.dropout:g}", file=sys.stderr)
        runs = []
        for repeat in range(args.repeats):
            runs.append(measure(__file__, SIDES, options_of(args) + [f"--work={work}"], args.steps, args.block))
            print(f"run {repeat + 1} of {args.repeats} done", file=sys.stderr, flush=True)
        report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
