"""Training throughput of the tensor-parallel layouts on CPU: dp1 x mp1 (the baseline, one process), dp1 x mp2 and
dp2 x mp2, each through msrun on this machine, on the default model with the same global batch.

On CPU the processes share the machine's cores and talk through loopback, so model parallelism is for checking
that a layout trains exactly as one device does, not for speed; the figures say what it costs here.

    .venv/bin/python bench/bench_parallel.py [--steps 30] [--batch 32] [--seq 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scratch import scratch_directory

# (name, data_parallel, model_parallel)
LAYOUTS = [("dp1 x mp1", 1, 1), ("dp1 x mp2", 1, 2), ("dp2 x mp2", 2, 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch (rows per step)")
    parser.add_argument("--seq", type=int, default=40)
    args = parser.parse_args()
    with scratch_directory("bench_parallel_") as work:
        return compare(args, work)


def compare(args, work: Path) -> int:
    from bench_train import synthetic_mindrecord

    from qwenbuild.manifest._presets import MODELS
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.train.msrun import run_msrun
    from qwenbuild.train.settings import TrainSettings, write_run_json
    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model

    os.chdir(work)
    cfg = QwenConfig(**MODELS["tiny"])
    records = synthetic_mindrecord(work / "train.mindrecord", 4000, args.seq, cfg.vocab_size)
    write_random_hf_model(cfg, 0, work / "hf")
    convert_weight(work / "hf", work / "init.ckpt", progress=None)
    print(f"default model, global batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{os.cpu_count()} cores", file=sys.stderr)
    results = {}
    for name, dp, mp in LAYOUTS:
        tag = name.replace(" x ", "_")
        write_strategy_files(cfg, dp, mp, 1, work / tag / "strategy", vocab_emb_dp=False)
        transform_ckpt("", work / tag / "strategy", work / "init.ckpt", work / tag / "shards", progress=None)
        settings = TrainSettings(model=cfg, train_data=records, output_dir=str(work / tag / "out"),
                                 seq_length=args.seq, batch_size=args.batch // dp, learning_rate=3e-3,
                                 steps=args.steps, save_steps=args.steps, data_parallel=dp, model_parallel=mp,
                                 init_checkpoint=str(work / tag / "shards"), strategy_dir=str(work / tag / "strategy"))
        write_run_json(work / tag / "run.json", settings)
        run_msrun(dp * mp, work / tag / "run.json", work / tag / "logs")
        results[name] = json.loads((work / tag / "out" / "metrics.json").read_text())
    base = results[LAYOUTS[0][0]]
    for name, dp, mp in LAYOUTS:
        r = results[name]
        gap = max(abs(a - b) for a, b in zip(r["loss"], base["loss"]))
        print(f"{name}: {dp * mp} process(es) {r['tokens_per_s']:8.0f} tokens/s  ratio to dp1 x mp1 "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x  largest per-step loss gap {gap:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
