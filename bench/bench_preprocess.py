"""ChatML -> MindRecord at seq_length 2048: `qwenbuild preprocess` against the original algorithm (slow
Qwen2Tokenizer, one apply_chat_template and one write_raw_data per row), both in the same run on the same
generated alpaca-shaped rows and the real Qwen1.5 tokenizer. Both are timed as whole commands, from start to exit
(interpreter, imports, tokenizer loading and worker processes included), wall clock and CPU seconds of the whole
process tree; also peak RSS of qwenbuild's process tree, and the first rows of both outputs compared. On a machine
shared with other work, wall-clock ratios understate a multi-process program; the CPU-per-row ratio and the printed
CPU pressure say how much.

  python bench/bench_preprocess.py [--rows 52002] [--baseline_rows 1500] [--processes N] [--keep DIR]

The original runs on its first --baseline_rows rows; its whole command at --rows is that run plus its row loop
extrapolated linearly (it is linear: one row at a time). --baseline_rows equal to --rows runs it on every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from scratch import scratch_directory

SEQ_LENGTH = 2048
WORDS = ("the a of to and in is that for it with as on be by this are or from at an which can use your will "
         "data model time people water health energy story world make more way write list three example "
         "describe explain give following sentence create new good important help work system learn").split()
ZH = "我们的数据模型可以帮助人们学习世界上重要的知识今天天气很好请解释下面句子"

ORIGINAL = """
import json, sys, time
import numpy as np
from mindspore.mindrecord import FileWriter
from transformers import Qwen2Tokenizer
src, tok_dir, out, rows, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
start, cpu_start = time.perf_counter(), cpu_seconds()
tok = Qwen2Tokenizer.from_pretrained(tok_dir)  # vocab.json + merges.txt, specials and ChatML template
writer = FileWriter(file_name=out, shard_num=1)
writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in ("input_ids", "target_ids", "attention_mask")})
with open(src, encoding="utf-8") as f:
    for i, line in enumerate(f):
        if i == rows:
            break
        ids = np.array(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True,
                       add_generation_prompt=False, padding="max_length", max_length=seq + 1, truncation=True),
                       dtype=np.int32)
        target = ids.copy()
        target[ids == tok.pad_token_id] = -100
        mask = np.where(ids == tok.pad_token_id, 0, 1).astype(np.int32)
        writer.write_raw_data([{"input_ids": ids, "target_ids": target, "attention_mask": mask}])
writer.commit()
print(time.perf_counter() - start)
print(cpu_seconds() - cpu_start)
"""

# CPU seconds of the script and of every process it started and reaped (the tokenizing workers)
CPU_CLOCK = """
import resource
def cpu_seconds():
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))
"""

def words(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    if rng.random() < 0.15:
        return "".join(rng.choice(ZH) for _ in range(n * 2))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def alpaca_rows(count: int, seed: int = 0) -> list[dict]:
    """Shaped like the Stanford set: short instructions, input in about 40% of rows, outputs of 5 to 350 words."""
    rng = random.Random(seed)
    return [{"instruction": words(rng, 4, 20), "input": words(rng, 3, 40) if rng.random() < 0.4 else "",
             "output": words(rng, 5, int(rng.expovariate(1 / 90)) + 6)} for _ in range(count)]


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return 0.0


def cpu_pressure() -> str:
    """Share of time runnable tasks waited for a CPU over the last 60 s (other users of this machine)."""
    try:
        some = open("/proc/pressure/cpu").read().split("\n")[0]
        return some.split("avg60=")[1].split()[0] + "%"
    except (OSError, IndexError):
        return "unknown"


class _Popen(subprocess.Popen):
    """Popen that keeps the child's resource usage (its reaped descendants included) when it is waited for."""

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid:
            self.rusage = usage
        return pid, status


@dataclasses.dataclass
class Timing:
    wall: float  # whole command, start to exit
    cpu: float  # user + system of the command and every process it reaped
    peak_mb: float  # peak RSS of the process tree
    loop: tuple[float, float] | None  # (wall, CPU) the original reports for its row loop alone


def run(argv: list, cwd: Path) -> Timing:
    start = time.perf_counter()
    proc = _Popen([str(a) for a in argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0.0], threading.Event()

    def sample():  # never polls the child: the wait that reaps it must be the one that reads its resource usage
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"benchmark step failed:\n{err[-3000:]}")
    cpu = proc.rusage.ru_utime + proc.rusage.ru_stime
    lines = out.strip().splitlines()
    loop = (float(lines[-2]), float(lines[-1])) if argv[1] == "-c" else None
    return Timing(wall, cpu, peak[0], loop)


def first_rows_equal(a: Path, b: Path, count: int) -> bool:
    import mindspore.dataset as ds
    import numpy as np

    cols = ["input_ids", "target_ids", "attention_mask"]
    da = ds.MindDataset(str(a), columns_list=cols, shuffle=False).create_tuple_iterator(output_numpy=True)
    db = ds.MindDataset(str(b), columns_list=cols, shuffle=False).create_tuple_iterator(output_numpy=True)
    for _, ra, rb in zip(range(count), da, db):
        if not all(np.array_equal(x, y) for x, y in zip(ra, rb)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52_002, help="the Stanford alpaca set's size")
    parser.add_argument("--baseline_rows", type=int, default=1_500)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="encoding processes besides the writing one (preprocess's default for large inputs)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the generated files in this directory")
    args = parser.parse_args()
    with scratch_directory("bench-preprocess-", args.keep) as work:
        compare(args, work)


def compare(args, work: Path) -> None:
    from qwenbuild.data.alpaca import convert_alpaca
    from qwenbuild.tokenizer import build_qwen_tokenizer

    start = time.perf_counter()
    build_qwen_tokenizer(work / "tokenizer")
    build_seconds = time.perf_counter() - start
    (work / "alpaca.json").write_text(json.dumps(alpaca_rows(args.rows), ensure_ascii=False), encoding="utf-8")
    convert_alpaca(work / "alpaca.json", work / "chatml.jsonl")

    baseline_rows = min(args.baseline_rows, args.rows)
    for old in work.glob("*.mindrecord*"):  # a kept directory's earlier outputs: FileWriter refuses to overwrite
        old.unlink()
    base = run([sys.executable, "-c", CPU_CLOCK + ORIGINAL, work / "chatml.jsonl", work / "tokenizer",
                work / "original.mindrecord", baseline_rows, SEQ_LENGTH], work)
    ours = run([sys.executable, "-m", "qwenbuild", "preprocess", "--input_glob", work / "chatml.jsonl",
                "--vocab_file", work / "tokenizer" / "vocab.json", "--merges_file", work / "tokenizer" / "merges.txt",
                "--seq_length", SEQ_LENGTH, "--output_file", work / "ours.mindrecord", "--processes", args.processes], work)
    # the original's whole command at --rows: its startup as measured, its row loop scaled
    scale = args.rows / baseline_rows - 1
    base_wall, base_cpu = base.wall + base.loop[0] * scale, base.cpu + base.loop[1] * scale
    same = first_rows_equal(work / "ours.mindrecord", work / "original.mindrecord", baseline_rows)
    size = (work / "ours.mindrecord").stat().st_size / 2**20
    print(f"tokenizer build (151,643 tokens, 151,387 merges): {build_seconds:.1f} s")
    print(f"original algorithm, whole command: {baseline_rows:,} rows in {base.wall:.1f} s (row loop "
          f"{base.loop[0]:.1f} s = {baseline_rows / base.loop[0]:,.0f} rows/s); at {args.rows:,} rows "
          f"{base_wall:,.1f} s, {1000 * base_cpu / args.rows:.2f} CPU ms/row")
    print(f"qwenbuild preprocess, whole command, {args.processes} processes: {args.rows:,} rows in {ours.wall:.1f} s = "
          f"{args.rows / ours.wall:,.0f} rows/s, {1000 * ours.cpu / args.rows:.2f} CPU ms/row, peak RSS "
          f"{ours.peak_mb:,.0f} MB (process tree), output {size:,.0f} MiB")
    print(f"speed-up, whole commands: {base_wall / ours.wall:.1f}x wall, {base_cpu / ours.cpu:.1f}x CPU; first "
          f"{baseline_rows:,} rows identical: {same}; CPU pressure from other processes (avg60): {cpu_pressure()}")


if __name__ == "__main__":
    main()
