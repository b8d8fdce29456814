"""Training throughput: qwenbuild (MindSpore GRAPH mode) vs transformers + torch on the identical model and batches.

Both start from the same seeded Hugging Face checkpoint, read the same rows in the same order, use AdamW
(betas 0.9/0.95, eps 1e-8, decoupled decay of 2-D parameters), the same cosine schedule and clipping, with the same
thread count. Each trains in a process of its own (no framework's idle threads share the other's process), the two
taking turns every --block steps so that both run under the same conditions (on a shared machine a neighbour's burst
otherwise lands on one side only). The first step of each (graph compile, allocation) is not timed. Prints tokens/s
of each and their ratio for every run and the medians over --repeats runs, and how far apart the loss curves end up.

    .venv/bin/python bench/bench_train.py [--steps 60] [--batch 16] [--seq 64] [--block 5] [--repeats 3]
    .venv/bin/python bench/bench_train.py --shape 0.5b --steps 4 --batch 2 --seq 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from published import qwen_config
from scratch import scratch_directory
from torch_train import load_qwen2, torch_steps
from turns import current_rss_mb, measure, options_of, serve, tokens_per_s

SIDES = ("qwenbuild", "torch")


def default_model(vocab: int, seq: int):
    from qwenbuild.model.config import QwenConfig

    return QwenConfig(vocab_size=vocab, hidden_size=128, num_layers=4, num_heads=4, n_kv_heads=2,
                      intermediate_size=384, rope_theta=10000.0, max_position_embeddings=max(seq, 128))


def half_billion_model(seq: int):
    """Qwen1.5-0.5B's published config (random weights, float32): 24 layers, hidden 1024, 16/16 heads, FFN 2816, tied
    151,936 vocab."""
    return qwen_config("qwen1.5-0.5b", param_dtype="float32", compute_dtype="float32")


def synthetic_mindrecord(path: Path, rows: int, seq: int, vocab: int) -> str:
    from mindspore.mindrecord import FileWriter

    rng = np.random.default_rng(0)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in ("input_ids", "target_ids", "attention_mask")})
    for _ in range(rows):
        x = ((rng.integers(0, vocab) + rng.integers(1, 7) * np.arange(seq + 1)) % vocab).astype(np.int32)
        writer.write_raw_data([{"input_ids": x, "target_ids": x, "attention_mask": np.ones_like(x)}])
    writer.commit()
    return str(path)


def run_settings(args, work: Path):
    from qwenbuild.train.settings import TrainSettings

    cfg = default_model(args.vocab, args.seq) if args.shape == "tiny" else half_billion_model(args.seq)
    records = args.mindrecord or str(work / "train.mindrecord")
    return TrainSettings(model=cfg, train_data=records, output_dir=str(work / "out"), seq_length=args.seq,
                         batch_size=args.batch, learning_rate=args.lr, warmup_ratio=0.05, steps=args.steps,
                         save_steps=args.steps, init_checkpoint=str(work / "init.ckpt"), threads=args.threads)


def qwenbuild_side(settings, rows_by_epoch, lrs):
    """qwenbuild's training step (the cell finetune runs, MindSpore GRAPH mode), built and started as finetune does
    (initial weights loaded; LoRA adapters drawn), one (loss, seconds) per step, timed as finetune times it: the
    call and reading the loss back."""
    import mindspore as ms

    from qwenbuild.model.adapters import set_dropout_masks
    from qwenbuild.parallel.rank_layout import single_process
    from qwenbuild.train import data
    from qwenbuild.train.finetune import build, start_mindspore, start_state

    start_mindspore(settings, 1)
    net, train_step = build(settings)
    start_state(settings, net, train_step, single_process(), 10**9, "bench")
    for step, (input_ids, target_ids) in enumerate(data.batches(settings.train_data, rows_by_epoch,
                                                                settings.batch_size)):
        t0 = time.perf_counter()
        if settings.lora and settings.lora.dropout:
            set_dropout_masks(net, settings.seed, step)  # as finetune does, inside the step's time
        loss, _ = train_step(ms.Tensor(input_ids), ms.Tensor(target_ids), ms.Tensor(np.float32(lrs[step])))
        yield float(loss.asnumpy()), time.perf_counter() - t0


def torch_side(hf_dir: Path, settings, rows_by_epoch, lrs):
    """transformers + torch, weight decay on 2-D parameters only, as qwenbuild's (and MindFormers') AdamW groups
    them."""
    model = load_qwen2(hf_dir, settings)
    groups = [{"params": [p for p in model.parameters() if (p.dim() > 1) == on],
               "weight_decay": settings.weight_decay if on else 0.0} for on in (True, False)]
    return torch_steps(model, groups, settings, rows_by_epoch, lrs)


def run_side(args) -> int:
    from qwenbuild.train import data
    from qwenbuild.train.schedule import schedule

    work = Path(args.work)
    os.chdir(work)  # mindformers and MindSpore write logs into the working directory
    settings = run_settings(args, work)
    rows = data.check_mindrecord(settings.train_data, args.seq)
    rows_by_epoch = data.rank_rows_by_epoch(rows, args.batch, settings.seed, 0, args.steps, 0, args.batch)
    lrs = schedule(args.steps, args.lr, settings.warmup_ratio)
    before = current_rss_mb()
    steps = qwenbuild_side(settings, rows_by_epoch, lrs) if args.side == "qwenbuild" else \
        torch_side(work / "hf", settings, rows_by_epoch, lrs)
    return serve(steps, {"rss_before_mb": before})


def prepare(args, work: Path) -> None:
    from qwenbuild.model.params import num_parameters
    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model

    os.chdir(work)
    cfg = run_settings(args, work).model
    if not args.mindrecord:
        synthetic_mindrecord(work / "train.mindrecord", 2000, args.seq, cfg.vocab_size)
    write_random_hf_model(cfg, 0, work / "hf")
    convert_weight(work / "hf", work / "init.ckpt", progress=None)
    print(f"model {num_parameters(cfg) / 1e6:.2f}M params, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps, {args.threads} threads", file=sys.stderr)


def report(args, runs: list[dict[str, dict]]) -> None:
    tokens = args.batch * args.seq
    speed = {s: [tokens_per_s(r[s]["seconds"], tokens) for r in runs] for s in SIDES}
    ratios = [a / b for a, b in zip(speed["qwenbuild"], speed["torch"])]
    for side, label in (("qwenbuild", "qwenbuild (MindSpore GRAPH)"), ("torch", "transformers + torch")):
        peak = statistics.median(r[side]["peak_rss_mb"] for r in runs)
        print(f"{label + ':':29s} {statistics.median(speed[side]):8.0f} tokens/s (runs: "
              f"{', '.join(f'{v:.0f}' for v in speed[side])}), peak RSS {peak:.0f} MB")
    gaps = [float(np.max(np.abs(np.array(r["qwenbuild"]["loss"]) - np.array(r["torch"]["loss"])))) for r in runs]
    ours = runs[0]["qwenbuild"]["loss"]
    print(f"ratio qwenbuild / torch: {statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}x' for r in ratios)}); "
          f"loss {ours[0]:.4f} -> {ours[-1]:.4f}, largest per-step gap {max(gaps):.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mindrecord", help="train on this MindRecord instead of synthetic rows (vocab must fit)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of both sides (medians are printed)")
    parser.add_argument("--block", type=int, help="steps each side runs before the other's turn (default 5); 0: torch to "
                        "the end, then qwenbuild (default for --shape 0.5b: both models at once do not fit in 24 GB)")
    parser.add_argument("--shape", choices=("tiny", "0.5b"), default="tiny",
                        help="tiny (default: hidden 128, 4 layers, --vocab) or Qwen1.5-0.5B's shape (use few --steps, "
                             "small --batch and --seq: about 8 GB of weights, gradients and moments per framework)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    if args.block is None:
        args.block = 0 if args.shape == "0.5b" else 5
    with scratch_directory("bench_train_") as work:
        prepare(args, work)
        runs = []
        for repeat in range(args.repeats):
            runs.append(measure(__file__, SIDES[::-1], options_of(args) + [f"--work={work}"], args.steps, args.block))
            print(f"run {repeat + 1} of {args.repeats} done", file=sys.stderr, flush=True)
        report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
