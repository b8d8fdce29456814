"""Decode speed through the commands users run: `doit export` (one rank, float32) makes the MINDIR graphs of a model
with a published Qwen1.5 config (random weights), `qwenbuild infer --json` reports its decode tokens/s; beside it the
same graphs driven in this process, and transformers generate with its KV cache (torch, 2 threads) on the same
weights and prompt, all in one run.

    .venv/bin/python bench/bench_decode.py [--model tiny|qwen1.5-0.5b|qwen1.5-1.8b] [--seq_length 128] [--new 48]

--model takes its config.json from bench/published_configs.json (tie_word_embeddings as published: 0.5B tied, 1.8B
not); `tiny` is a small model (hidden 128, 4 layers, vocab 2048) with a tokenizer trained on the builtin data.
Decode tokens/s counts the tokens of decode calls only (the prefill and its first token apart): qwenbuild infer
reports it so; transformers' decode time is generate(new) minus generate(1). Greedy; generation stops at the
tokenizer's eos ids, and torch then makes as many tokens. Medians of --repeat runs (whole infer commands).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from published import NAMES, hf_config
from scratch import scratch_directory

MODELS = ("tiny",) + NAMES
PROMPT = "Write a short story about a robot who learns to paint."
TINY = {"vocab_size": 2048, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 384, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def published(name: str) -> dict:
    """The config.json a model is built from."""
    return dict(TINY) if name == "tiny" else hf_config(name)


def write_model(hf_dir: Path, config: dict) -> None:
    """Seeded random weights (in the config's torch_dtype) under the config.json exactly as given."""
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.random_init import write_random_hf_model

    write_random_hf_model(QwenConfig.from_hf_dict(config), 0, hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_project(project: Path, hf_dir: Path, tiny: bool, seq_length: int) -> None:
    """qwen.toml exporting the converted weights as one rank in float32, and the dodo.py `qwenbuild init` writes."""
    from qwenbuild.commands.init import DODO_TEXT

    project.mkdir()
    tokenizer = 'kind = "trained"\nvocab_size = 505' if tiny else 'kind = "qwen"'
    (project / "qwen.toml").write_text(f"""[model]
init = "hf"
hf_dir = "{hf_dir}"
param_dtype = "float32"
compute_dtype = "float32"

[tokenizer]
{tokenizer}

[dataset]
source = "builtin"
seq_length = 64

[hardware]
device = "cpu"
devices_per_node = 1
device_memory_gb = 20

[[hardware.nodes]]
host = "localhost"
ip = "127.0.0.1"

[parallel]
data_parallel = 1
model_parallel = 1
pipeline_stage = 1

[train]

[export]
checkpoint = "converted"
seq_length = {seq_length}
batch_size = 1
model_parallel = 1
use_past = true
""")
    (project / "dodo.py").write_text(DODO_TEXT)


def command(argv: list, cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of a whole command; its output is shown when it fails."""
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, argv))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start, done.stdout


def rss_mib() -> float:
    """This process's resident set size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def time_in_process(root: Path, prompt: list[int], new: int, eos: list[int], repeat: int):
    """The exported graphs driven here as qwenbuild infer drives them: (median decode tokens/s, tokens, RSS MiB
    growth over the runs after the first)."""
    from qwenbuild.export.graph_files import FULL, INC
    from qwenbuild.infer.backends import GraphCellBackend
    from qwenbuild.infer.runtime import generate_ids, open_export, warm_up

    info = open_export(root)
    backend = GraphCellBackend(info.graph_path(FULL), info.graph_path(INC))
    warm_up(backend, info)
    runs = [generate_ids(backend, info, [prompt], new, eos_ids=eos)]
    before = rss_mib()
    runs += [generate_ids(backend, info, [prompt], new, eos_ids=eos) for _ in range(repeat - 1)]
    growth = rss_mib() - before
    tokens = runs[0][0][0]
    rate = statistics.median((len(tokens) - 1) / (total - prefill) for _, (total, prefill) in runs)
    return rate, tokens, growth


def time_transformers(hf_dir: Path, prompt: list[int], new: int, repeat: int, threads: int):
    """(median decode tokens/s, tokens, read_once seconds) of transformers generate, KV cache, float32, `threads`
    intra-op threads."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(threads)
    model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
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
    rate = statistics.median((new - 1) / (full - first) for first, (full, _) in runs)
    return rate, runs[0][1][1], read_once(model)


def read_once(model) -> float:
    """Fastest of 5 passes summing every weight a decoded token reads (the layers, the final norm, lm_head, which
    is the embedding table when tied): the memory bound of a float32 decode step here."""
    import torch

    weights = [*model.model.layers.parameters(), *model.model.norm.parameters(), model.lm_head.weight]
    times = []
    with torch.no_grad():
        for _ in range(5):
            t = time.perf_counter()
            for w in weights:
                w.sum()
            times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--seq_length", type=int, default=128, help="export.seq_length (default 128)")
    parser.add_argument("--new", type=int, default=48, help="new tokens per run (default 48)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch_threads", default="2", help="comma list of torch intra-op thread counts (default 2)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the model, project and build in this directory")
    args = parser.parse_args(argv)
    config = published(args.model)
    with scratch_directory("bench_decode_", args.keep) as tmp:
        hf_dir, project = tmp / "hf", tmp / "project"
        if not hf_dir.exists():
            write_model(hf_dir, config)
        if not project.exists():
            write_project(project, hf_dir, args.model == "tiny", args.seq_length)
        bin_dir = Path(sys.executable).parent
        export_seconds, _ = command([bin_dir / "doit", "export"], project)
        infer = [bin_dir / "qwenbuild", "infer", "--predict_data", PROMPT, "--max_new_tokens", args.new, "--json"]
        reports = [json.loads(command(infer, project)[1].splitlines()[-1]) for _ in range(args.repeat)]
        infer_rate = statistics.median(r["decode_tokens_per_s"] for r in reports)
        prompt, tokens = reports[0]["prompt_ids"], reports[0]["generated_ids"]
        from qwenbuild.build_dir import BuildDir
        from qwenbuild.tokenizer import load_tokenizer, stop_ids

        build = BuildDir(project / "build")
        eos = stop_ids(load_tokenizer(build.tokenizer))
        ours_rate, ours_tokens, growth = time_in_process(build.export, prompt, args.new, eos, args.repeat)
        gc.collect()  # the graphs' weights go before torch loads its copy
        hf = {t: time_transformers(hf_dir, prompt, len(tokens), args.repeat, t)
              for t in (int(t) for t in args.torch_threads.split(","))}
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.model.params import num_parameters

    cfg = QwenConfig.from_hf_dict(config)
    # a token reads every weight once, the embedding table only as the tied output projection
    read = 4 * (num_parameters(cfg) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)) / 1e9
    print(f"model {args.model}: hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/"
          f"{cfg.n_kv_heads}, vocab {cfg.vocab_size}, tied {cfg.tie_word_embeddings}, float32 {read:.3f} GB read per "
          f"token; prompt {len(prompt)} + {len(tokens)} new tokens, export.seq_length {args.seq_length}; doit export "
          f"{export_seconds:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    runs = ", ".join(f"{r['decode_tokens_per_s']:.2f}" for r in reports)
    print(f"qwenbuild infer (whole command, reported): decode {infer_rate:7.2f} tokens/s (runs: {runs}), "
          f"{read * infer_rate:.1f} GB/s")
    print(f"exported graphs in this process:          decode {ours_rate:7.2f} tokens/s; RSS growth over "
          f"{args.repeat - 1} more runs: {growth:+.1f} MiB; same tokens as infer: {ours_tokens == tokens}")
    for threads, (hf_rate, hf_tokens, seconds) in hf.items():
        print(f"reading those weights once (torch sum, {threads} threads): {seconds * 1000:.0f} ms = "
              f"{read / seconds:.1f} GB/s: no float32 decode step here beats {1 / seconds:.2f} tokens/s")
        print(f"transformers generate (KV, {threads} thread{'s' if threads > 1 else ''}):   decode {hf_rate:7.2f} "
              f"tokens/s, {read * hf_rate:.1f} GB/s -> ratio: qwenbuild infer {infer_rate / hf_rate:.2f}x, in "
              f"process {ours_rate / hf_rate:.2f}x; same tokens: {hf_tokens == tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
