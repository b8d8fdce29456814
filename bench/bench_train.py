"""Training throughput: qwenbuild (MindSpore GRAPH mode) vs transformers + torch on the identical model and batches.

Both start from the same seeded Hugging Face checkpoint, read the same rows in the same order, use AdamW
(betas 0.9/0.95, eps 1e-8, decoupled decay of 2-D parameters), the same cosine schedule and clipping, with the same
thread count, in one process, taking turns every --block steps so that both run under the same conditions (on a
shared machine a neighbour's burst otherwise lands on one side only). The first step of each (graph compile,
allocation) is not timed. Prints tokens/s of each, the ratio, and how far apart the two loss curves end up.

    .venv/bin/python bench/bench_train.py [--steps 60] [--batch 16] [--seq 64] [--block 5] [--mindrecord FILE]
    .venv/bin/python bench/bench_train.py --shape 0.5b --steps 6 --batch 2 --seq 64
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
from published import qwen_config
from scratch import scratch_directory


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


def torch_steps(hf_dir: Path, settings, rows_by_epoch, lrs, threads: int):
    """transformers + torch training, one (loss, seconds) per step."""
    import torch
    from transformers import Qwen2ForCausalLM

    from qwenbuild.train import data

    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.train()
    # weight decay on 2-D parameters only, as qwenbuild's (and MindFormers') AdamW groups them
    groups = [{"params": [p for p in model.parameters() if (p.dim() > 1) == on],
               "weight_decay": settings.weight_decay if on else 0.0} for on in (True, False)]
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(settings.beta1, settings.beta2), eps=settings.eps)
    for step, (input_ids, target_ids) in enumerate(data.batches(settings.train_data, rows_by_epoch, settings.batch_size)):
        t0 = time.perf_counter()
        tokens = torch.from_numpy(input_ids[:, :-1].astype(np.int64))
        labels = torch.from_numpy(target_ids[:, 1:].astype(np.int64))
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.step()
        value = float(loss.detach())
        yield value, time.perf_counter() - t0


def qwenbuild_steps(settings, rows_by_epoch, lrs):
    """qwenbuild's training step (the cell finetune runs, MindSpore GRAPH mode), one (loss, seconds) per step,
    timed as finetune times it: the call and reading the loss back."""
    import mindspore as ms

    from qwenbuild.train import checkpoint, data
    from qwenbuild.train.finetune import build, start_mindspore

    start_mindspore(settings, 1)
    _, train_step = build(settings)
    checkpoint.load_into(train_step, checkpoint.init_checkpoint_file(settings.init_checkpoint, 0),
                         [p.name for p in train_step.weights])
    for step, (input_ids, target_ids) in enumerate(data.batches(settings.train_data, rows_by_epoch, settings.batch_size)):
        t0 = time.perf_counter()
        loss, _ = train_step(ms.Tensor(input_ids), ms.Tensor(target_ids), ms.Tensor(np.float32(lrs[step])))
        value = float(loss.asnumpy())
        yield value, time.perf_counter() - t0


def take_turns(runs: list, block: int) -> list[tuple[list[float], list[float]]]:
    """Advance each run `block` steps in turn until all end (block 0: each to its end, one after the other);
    (losses, seconds) of each."""
    results = [([], []) for _ in runs]
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            losses, seconds = results[i]
            before = len(losses)
            for loss, took in itertools.islice(runs[i], block or None):
                losses.append(loss)
                seconds.append(took)
            if not block or len(losses) - before < block:
                active.remove(i)
                gc.collect()  # a finished run's model goes before the next one grows (0.5B: both do not fit)
    return results


def tokens_per_s(seconds: list[float], tokens_per_step: int) -> float:
    steady = seconds[1:] or seconds  # the first step compiles
    return tokens_per_step * len(steady) / sum(steady)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mindrecord", help="train on this MindRecord instead of synthetic rows (vocab must fit)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--block", type=int, help="steps each side runs before the other's turn (default 5); 0: torch to "
                        "the end, then qwenbuild (default for --shape 0.5b: both models at once do not fit in 24 GB)")
    parser.add_argument("--shape", choices=("tiny", "0.5b"), default="tiny",
                        help="tiny (default: hidden 128, 4 layers, --vocab) or Qwen1.5-0.5B's shape (use few --steps, "
                             "small --batch and --seq: about 8 GB of weights, gradients and moments per framework)")
    args = parser.parse_args()
    if args.block is None:
        args.block = 0 if args.shape == "0.5b" else 5
    with scratch_directory("bench_train_") as work:
        return compare(args, work)


def compare(args, work: Path) -> int:
    from qwenbuild.train import data
    from qwenbuild.train.schedule import schedule
    from qwenbuild.train.settings import TrainSettings
    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model
    from qwenbuild.model.params import num_parameters

    os.chdir(work)  # mindformers and MindSpore write logs into the working directory
    cfg = default_model(args.vocab, args.seq) if args.shape == "tiny" else half_billion_model(args.seq)
    args.vocab = cfg.vocab_size
    records = args.mindrecord or synthetic_mindrecord(work / "train.mindrecord", 2000, args.seq, args.vocab)
    write_random_hf_model(cfg, 0, work / "hf")
    convert_weight(work / "hf", work / "init.ckpt", progress=None)
    settings = TrainSettings(model=cfg, train_data=str(records), output_dir=str(work / "out"), seq_length=args.seq,
                             batch_size=args.batch, learning_rate=args.lr, warmup_ratio=0.05, steps=args.steps,
                             save_steps=args.steps, init_checkpoint=str(work / "init.ckpt"), threads=args.threads)
    rows = data.check_mindrecord(records, args.seq)
    rows_by_epoch = data.rank_rows_by_epoch(rows, args.batch, settings.seed, 0, args.steps, 0, args.batch)
    lrs = schedule(args.steps, args.lr, settings.warmup_ratio)
    tokens_per_step = args.batch * args.seq

    print(f"model {num_parameters(cfg) / 1e6:.2f}M params, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps, {args.threads} threads", file=sys.stderr)
    torch_run = torch_steps(work / "hf", settings, rows_by_epoch, lrs, args.threads)
    (theirs_loss, theirs_times), (ours_loss, ours_times) = take_turns(
        [torch_run, qwenbuild_steps(settings, rows_by_epoch, lrs)], args.block)
    ours_tps, theirs_tps = tokens_per_s(ours_times, tokens_per_step), tokens_per_s(theirs_times, tokens_per_step)
    gap = float(np.max(np.abs(np.array(ours_loss) - np.array(theirs_loss))))
    print(f"qwenbuild (MindSpore GRAPH): {ours_tps:8.0f} tokens/s  (compile {ours_times[0]:.1f} s, "
          f"loss {ours_loss[0]:.4f} -> {ours_loss[-1]:.4f})")
    print(f"transformers + torch:        {theirs_tps:8.0f} tokens/s  "
          f"(loss {theirs_loss[0]:.4f} -> {theirs_loss[-1]:.4f})")
    print(f"ratio qwenbuild / torch: {ours_tps / theirs_tps:.2f}x; largest per-step loss gap {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
