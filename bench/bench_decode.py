"""Decode speed of the exported MINDIR graphs (MindSpore GraphCell, CPU) against transformers generate with its
KV cache, on the same tiny random Qwen1.5 model and the same converted weights, in one run.

    .venv/bin/python bench/bench_decode.py [--hidden 128 --layers 4 --vocab 2048 --seq_length 256 --new 128]
    Qwen1.5-0.5B's shape: --hidden 1024 --layers 24 --heads 16 --kv_heads 16 --intermediate 2816 --vocab 151936

Decode tokens/s counts the tokens produced by decode steps only (prefill and its first token are timed apart):
transformers' decode time is generate(new) minus generate(1). Greedy, no eos, median of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from scratch import scratch_directory


def build(tmp: Path, args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwenbuild.export import export_mindir
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights import convert_weight

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate or args.hidden * 3,
                         max_position_embeddings=max(args.seq_length, 256),
                         initializer_range=0.2)
    Qwen2ForCausalLM(config).save_pretrained(tmp / "hf")
    convert_weight(tmp / "hf", tmp / "model.ckpt", progress=None)
    export_mindir(QwenConfig.from_hf_dir(tmp / "hf"), tmp / "model.ckpt", tmp / "output", batch_size=1,
                  seq_length=args.seq_length, progress=None)
    return Qwen2ForCausalLM.from_pretrained(tmp / "hf").eval()


def time_transformers(model, prompt, new: int, repeat: int):
    import torch

    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(new)  # warm-up
    runs = [(run(1)[0], run(new)) for _ in range(repeat)]
    decode = statistics.median(full - first for first, (full, _) in runs)
    return decode, statistics.median(full for _, (full, _) in runs), runs[0][1][1]


def rss_mib() -> float:
    """This process's resident set size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def time_exported(root: Path, prompt, new: int, repeat: int):
    """(median decode s, median total s, tokens, RSS MiB growth over the runs after the first)."""
    from qwenbuild.export.graph_files import FULL, INC
    from qwenbuild.infer.backends import GraphCellBackend
    from qwenbuild.infer.runtime import generate_ids, open_export, warm_up

    info = open_export(root)
    backend = GraphCellBackend(info.graph_path(FULL), info.graph_path(INC))
    warm_up(backend, info)
    runs = [generate_ids(backend, info, [prompt], new, eos_ids=())]
    before = rss_mib()
    runs += [generate_ids(backend, info, [prompt], new, eos_ids=()) for _ in range(repeat - 1)]
    growth = rss_mib() - before
    decode = statistics.median(total - prefill for _, (total, prefill) in runs)
    return decode, statistics.median(total for _, (total, _) in runs), runs[0][0][0], growth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=0, help="FFN size (default 3 x hidden; 0.5B: 2816)")
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch_threads", default="0,1",
                        help="comma list of torch intra-op thread counts to measure, 0 = torch's default (default 0,1)")
    args = parser.parse_args(argv)
    if args.prompt + args.new > args.seq_length:
        parser.error("--prompt + --new must not exceed --seq_length")
    import torch

    default_threads = torch.get_num_threads()
    thread_counts = [int(t) or default_threads for t in args.torch_threads.split(",")]
    prompt = [(7 * i + 3) % args.vocab for i in range(args.prompt)]
    with scratch_directory("bench_decode_") as tmp:
        os.chdir(tmp)
        hf_model = build(tmp, args)
        ms_decode, ms_total, ms_tokens, growth = time_exported(tmp / "output", prompt, args.new, args.repeat)
        hf = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            hf[threads] = time_transformers(hf_model, prompt, args.new, args.repeat)
    steps = args.new - 1
    ms_rate = steps / ms_decode
    print(f"model: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, vocab "
          f"{args.vocab}; prompt {args.prompt} + {args.new} new tokens, exported seq_length {args.seq_length}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"exported graphs (GraphCell):          decode {ms_rate:8.1f} tokens/s, "
          f"end-to-end {args.new / ms_total:8.1f} tokens/s; RSS growth over {args.repeat - 1} more runs of "
          f"{args.new} tokens: {growth:+.1f} MiB")
    for threads, (hf_decode, hf_total, hf_tokens) in hf.items():
        hf_rate = steps / hf_decode
        print(f"transformers generate (KV, {threads} thread{'s' if threads > 1 else ''}): decode {hf_rate:8.1f} "
              f"tokens/s, end-to-end {args.new / hf_total:8.1f} tokens/s -> ratio exported/transformers: decode "
              f"{ms_rate / hf_rate:.2f}x, end-to-end {hf_total / ms_total:.2f}x; same tokens: {ms_tokens == hf_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
