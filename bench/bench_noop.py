"""No-op build over large artifacts: how long `doit` takes to decide nothing needs rebuilding, and how many
artifact bytes it reads, against the baseline of re-hashing every artifact (what a content check without the
lock's size/mtime record would cost), measured in the same run.

  python bench/bench_noop.py [--gib 5] [--keep DIR]

It builds a manifest whose generated starting checkpoint and converted checkpoint together hold about --gib GiB
(init_weights + convert are real tasks), then times `doit convert` again (no-op) in a fresh process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_directory

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import runpy, sys, time
sys.argv = ["doit"] + sys.argv[1:]
t0 = time.perf_counter()
try:
    runpy.run_module("doit", run_name="__main__")
except SystemExit:
    pass
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("PROBE", time.perf_counter() - t0, io["rchar"], file=sys.stderr)
"""


def manifest_for(gib: float, where: Path) -> Path:
    # hidden 2048, intermediate 5504 float32: about 0.2 GiB a layer in each of the two checkpoints
    layers = max(1, round(gib / 2 / (4 * (4 * 2048 * 2048 + 3 * 2048 * 5504) / 2 ** 30)))
    text = (REPO / "qwen.toml").read_text()
    text = text.replace('preset = "tiny"', f'preset = "tiny"\nhidden_size = 2048\nnum_heads = 16\nn_kv_heads = 16\n'
                                           f'intermediate_size = 5504\nnum_layers = {layers}')
    path = where / "qwen.toml"
    path.write_text(text)
    return path


def doit(manifest: Path, *tasks: str, probe: bool = False) -> tuple[float, int, str]:
    args = ["-f", str(REPO / "dodo.py"), f"manifest={manifest}", *tasks]
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "doit", *args]
    proc = subprocess.run(cmd, cwd=manifest.parent, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    seconds, rchar = 0.0, 0
    for line in proc.stderr.splitlines():
        if line.startswith("PROBE"):
            seconds, rchar = float(line.split()[1]), int(line.split()[2])
    return seconds, rchar, proc.stdout


def rehash_all(build: Path) -> tuple[float, int]:
    from qwenbuild.digests import file_digest

    t0, total = time.perf_counter(), 0
    for p in build.rglob("*"):
        if p.is_file() and not p.name.startswith(".doit"):
            file_digest(p)
            total += p.stat().st_size
    return time.perf_counter() - t0, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=5.0)
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    with scratch_directory("qwenbuild-bench-noop-", args.keep) as where:
        compare(args, where)


def compare(args, where: Path) -> None:
    manifest = manifest_for(args.gib, where)
    t0 = time.perf_counter()
    doit(manifest, "convert")
    print(f"first build: {time.perf_counter() - t0:.1f} s")
    seconds, rchar, out = doit(manifest, "convert", probe=True)
    assert not [l for l in out.splitlines() if l.startswith(".  ")], out
    artifacts = sum(p.stat().st_size for p in (where / "build").rglob("*") if p.is_file())
    base_s, base_bytes = rehash_all(where / "build")
    print(json.dumps({"artifact_bytes": artifacts, "noop_seconds": round(seconds, 3), "noop_bytes_read": rchar,
                      "rehash_seconds": round(base_s, 3), "rehash_bytes_read": base_bytes,
                      "speedup_vs_rehash": round(base_s / seconds, 1),
                      "bytes_read_ratio": round(rchar / base_bytes, 6)}, indent=1))
    print(f"no-op over {artifacts / 2 ** 30:.2f} GiB of artifacts: {seconds:.2f} s (target < 2 s), read {rchar:,} "
          f"bytes of any file ({rchar / base_bytes:.2e} of the artifacts); re-hashing them: {base_s:.1f} s")


if __name__ == "__main__":
    main()
