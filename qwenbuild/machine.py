"""What this machine's CPU kernels compute with: the instruction-set extensions they dispatch on, and the thread count.

MindSpore's CPU kernels (oneDNN and its own nnacl) choose SSE, AVX2 or AVX-512 code at run time, and a training
worker runs as many threads as the machine has cores per worker: the same inputs give results that differ in the last
bits on another CPU, which a trained model amplifies. qwen.lock records this beside a task's versions.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# the extensions that change which kernel code runs (x86 and Arm names as /proc/cpuinfo spells them)
DISPATCHED = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm")


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text (every core of one machine reports the same)."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_record() -> dict:
    """{"arch", "model", "extensions", "cpus"} of this machine; the extensions are those kernels dispatch on."""
    try:
        fields = cpuinfo_fields(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        fields = {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"arch": platform.machine(), "model": fields.get("model name") or fields.get("CPU part") or "unknown",
            "extensions": [name for name in DISPATCHED if name in flags], "cpus": os.cpu_count() or 1}
