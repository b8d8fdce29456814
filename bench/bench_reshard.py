"""Resharding a complete checkpoint to N model-parallel ranks: qwenbuild's rank-by-rank transform_ckpt against
MindSpore's transform_checkpoints (which loads the whole source for every rank), in the same run.

Each method runs in its own subprocess; peak RSS is measured above the interpreter's RSS once mindspore is imported.
Prints time, peak RSS, the bound (2 x one rank's shard + the largest tensor) and ratios; checks both outputs are
byte-identical.

    .venv/bin/python bench/bench_reshard.py [--size-mb 1024] [--ranks 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_directory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up(workdir: Path) -> None:
    """First tensor, save and load set up MindSpore's runtime: count that as the interpreter, not the method."""
    import mindspore as ms
    import numpy as np

    path = workdir / "warm_up.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones((64, 64), np.float32))}], str(path))
    ms.load_checkpoint(str(path))
    path.unlink()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the peak (VmHWM) from the current RSS


def bench_config(size_mb: int):
    from qwenbuild.model.config import QwenConfig

    # embedding + lm_head take about a quarter of the checkpoint, as in Qwen1.5-0.5B
    h, ffn = 1024, 2816
    vocab = max(1024, int(size_mb * 2**20 / 4 / 8 / h) // 64 * 64)
    per_layer = 4 * h * h + 3 * h + 3 * h * ffn + 2 * h
    layers = max(1, round((size_mb * 2**20 / 4 - 2 * vocab * h) / per_layer))
    return QwenConfig(vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=16, n_kv_heads=16,
                      intermediate_size=ffn)


def make_source(cfg, path: Path) -> None:
    import mindspore as ms
    import numpy as np
    from qwenbuild.model.params import parameter_shapes

    rng = np.random.default_rng(0)
    items = [{"name": n, "data": ms.Tensor(rng.standard_normal(s, dtype=np.float32))}
             for n, s in parameter_shapes(cfg).items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(items, str(path))


def worker(method: str, src: str, strategy: str, out: str) -> None:
    import mindspore as ms
    from qwenbuild.parallel.reshard import transform_ckpt

    _warm_up(Path(out).parent)
    base = _rss_mb()
    t0 = time.perf_counter()
    if method == "qwenbuild":
        transform_ckpt("", strategy, src, out, progress=None)
    else:
        ms.transform_checkpoints(src, out, "checkpoint_", None, str(Path(strategy) / "ckpt_strategy_rank_0.json"))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_mb": base, "peak_mb": _peak_mb()}))


def run_worker(method: str, src: Path, strategy: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(src), str(strategy), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if done.returncode:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="source checkpoint size (default 1024)")
    parser.add_argument("--ranks", type=int, default=8, help="model_parallel of the destination (default 8)")
    parser.add_argument("--workdir", help="where to put the files (default: a temporary directory, removed)")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "SRC", "STRATEGY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from qwenbuild.model.params import parameter_shapes
    from qwenbuild.parallel.strategy import write_strategy_files

    with scratch_directory("bench-reshard-", args.workdir) as work:
        cfg = bench_config(args.size_mb)
        src = work / "full" / "rank_0" / "model.ckpt"
        t0 = time.perf_counter()
        make_source(cfg, src)
        print(f"source: {src.stat().st_size / 2**20:.0f} MiB, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
              f"written in {time.perf_counter() - t0:.1f} s", flush=True)
        strategy = work / "strategy"
        write_strategy_files(cfg, 1, args.ranks, 1, strategy)
        results = {}
        for method in ("qwenbuild", "mindspore"):
            results[method] = run_worker(method, work / "full", strategy, work / f"out_{method}")
            r = results[method]
            print(f"{method:>10}: {r['seconds']:6.1f} s, peak RSS {r['peak_mb']:7.0f} MiB "
                  f"({r['peak_mb'] - r['base_mb']:6.0f} MiB above {r['base_mb']:.0f} MiB after import)", flush=True)
        same = all(filecmp.cmp(work / f"out_qwenbuild/rank_{r}/checkpoint_{r}.ckpt",
                               work / f"out_mindspore/rank_{r}/checkpoint_{r}.ckpt", shallow=False)
                   for r in range(args.ranks))
        shard_mb = max((work / f"out_qwenbuild/rank_{r}/checkpoint_{r}.ckpt").stat().st_size
                       for r in range(args.ranks)) / 2**20
        largest_mb = max(4 * a * b for a, b in [s if len(s) == 2 else (s[0], 1)
                                                for s in parameter_shapes(cfg).values()]) / 2**20
        bound = 2 * shard_mb + largest_mb
        ours, theirs = results["qwenbuild"], results["mindspore"]
        ours_extra, theirs_extra = ours["peak_mb"] - ours["base_mb"], theirs["peak_mb"] - theirs["base_mb"]
        print(f"one rank's shard {shard_mb:.0f} MiB, largest tensor {largest_mb:.0f} MiB: "
              f"bound 2 x shard + largest = {bound:.0f} MiB")
        print(f"qwenbuild peak above import {ours_extra:.0f} MiB -> "
              f"{'within' if ours_extra <= bound else 'OVER'} the bound; outputs byte-identical: {same}")
        print(f"ratios qwenbuild/mindspore: time {ours['seconds'] / theirs['seconds']:.2f}, "
              f"peak RSS above import {ours_extra / theirs_extra:.2f}, total peak RSS "
              f"{ours['peak_mb'] / theirs['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
