"""HF -> MindSpore conversion of a Qwen1.5-0.5B-shaped bf16 model: `qwenbuild convert_weight` against the
original algorithm (transformers from_pretrained in float32, cast every tensor to float16, one save_checkpoint),
each in its own process, same run. Reports whole-process wall time and peak RSS, and their ratios.

  python bench/bench_convert.py [--scale 1.0] [--keep DIR]

--scale shrinks the model (layers and vocabulary) for a quick run; 1.0 is about 0.93 GB of safetensors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_directory

REPO = Path(__file__).resolve().parents[1]
QWENBUILD = Path(sys.executable).parent / "qwenbuild"

ORIGINAL = """
import sys
import mindspore as ms
from transformers import Qwen2ForCausalLM
from qwenbuild.model.params import hf_to_ms

model = Qwen2ForCausalLM.from_pretrained(sys.argv[1])
entries = [{"name": hf_to_ms(n), "data": ms.Tensor(p.detach().numpy(), dtype=ms.float16)}
           for n, p in model.named_parameters()]
ms.save_checkpoint(entries, sys.argv[2])
"""


def model_config(scale: float):
    from qwenbuild.model.config import QwenConfig

    vocab = max(64, int(151936 * scale) // 64 * 64)
    return QwenConfig(vocab_size=vocab, hidden_size=1024, num_layers=max(1, round(24 * scale)), num_heads=16,
                      n_kv_heads=16, intermediate_size=2816, tie_word_embeddings=True, param_dtype="bfloat16")


def measure(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def same_tensors(a: Path, b: Path) -> bool:
    from qwenbuild.weights.mindspore_ckpt import read_tensors

    ta, tb = {t.name: t for t in read_tensors(a)}, {t.name: t for t in read_tensors(b)}
    return ta.keys() == tb.keys() and all(
        ta[n].shape == tb[n].shape and ta[n].type_name == tb[n].type_name
        and b"".join(ta[n].chunks()) == b"".join(tb[n].chunks()) for n in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep its files")
    args = parser.parse_args()
    with scratch_directory("bench_convert_", args.keep) as work:
        compare(args, work)


def compare(args, work: Path) -> None:
    sys.path.insert(0, str(REPO))
    from qwenbuild.weights import write_random_hf_model
    from qwenbuild.model.params import num_parameters

    cfg = model_config(args.scale)
    hf = work / "hf"
    if not (hf / "model.safetensors").exists():
        write_random_hf_model(cfg, 0, hf)
    size_gb = (hf / "model.safetensors").stat().st_size / 1e9
    print(f"model: {num_parameters(cfg) / 1e6:.0f}M parameters, bf16, {size_gb:.2f} GB safetensors "
          f"({cfg.num_layers} layers, vocab {cfg.vocab_size})")

    runs = {
        "original (fp16)": [sys.executable, "-c", ORIGINAL, str(hf), str(work / "original.ckpt")],
        "qwenbuild --dtype fp16": [str(QWENBUILD), "convert_weight", "--torch_ckpt_dir", str(hf),
                                   "--mindspore_ckpt_path", str(work / "qwenbuild_fp16.ckpt"), "--dtype", "fp16"],
        "qwenbuild (keeps bf16)": [str(QWENBUILD), "convert_weight", "--torch_ckpt_dir", str(hf),
                                   "--mindspore_ckpt_path", str(work / "qwenbuild_bf16.ckpt")],
    }
    results = {name: measure(cmd, work) for name, cmd in runs.items()}
    base_s, base_mb = results["original (fp16)"]
    print(f"{'run':26} {'wall s':>8} {'peak RSS MB':>12} {'time ratio':>11} {'RSS ratio':>10}")
    for name, (s, mb) in results.items():
        print(f"{name:26} {s:8.2f} {mb:12.0f} {s / base_s:11.2f} {mb / base_mb:10.3f}")
    print(f"largest tensor: {cfg.vocab_size * cfg.hidden_size * 2 / 1e6:.0f} MB bf16; largest shard: "
          f"{size_gb * 1e3:.0f} MB")
    print("fp16 outputs hold identical tensors:", same_tensors(work / "original.ckpt", work / "qwenbuild_fp16.ckpt"))


if __name__ == "__main__":
    main()
