"""verify's comparison of two builds: each differing artifact, and the machine a task was recorded on when it is not
the one that rebuilt it (qwen.lock's machine record). One machine runs the tests, so the CPU each build sees is a
/proc/cpuinfo text; the task, doit's action, the lock and the comparison are the real ones."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from qwenbuild import machine
from qwenbuild.build_dir import BuildDir
from qwenbuild.lock import Lock
from qwenbuild.machine import cpu_record
from qwenbuild.manifest import load_manifest
from qwenbuild.tasks.doit_tasks import run_task
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.tasks.staleness import stale_reasons
from qwenbuild.verify import compare_locks, machine_changes

REPO = Path(__file__).resolve().parents[1]
XEON = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl "
        "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nmodel name\t: (not read)\n")
EPYC = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2\n")
XEON_ONLY = "avx512f, avx512dq, avx512bw, avx512vl, avx512_vnni, avx512_bf16, amx_tile, amx_bf16, amx_int8"


def _build_on(tmp_path: Path, monkeypatch, name: str, cpuinfo: str) -> tuple[Path, TaskSpec]:
    """Run a task whose output follows the CPU, as a kernel choosing its code by the CPU's extensions does."""
    (tmp_path / f"{name}.cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / f"{name}.cpuinfo")
    root = tmp_path / name
    root.mkdir()

    def action(ctx):
        widest = "avx512f" if "avx512f" in cpu_record()["extensions"] else "avx2"
        (root / "sums.txt").write_text(f"kernel {widest}\n")

    spec = TaskSpec("probe", "", action, keys=("train.seed",), outputs=[root / "sums.txt"], machine=("cpu",))
    assert run_task(spec, load_manifest(REPO / "qwen.toml"), BuildDir(root)) is None
    return root, spec


def test_a_difference_names_the_machine_it_was_recorded_on(tmp_path, monkeypatch):
    recorded, spec = _build_on(tmp_path, monkeypatch, "xeon", XEON)
    entry = Lock(recorded / "qwen.lock").entry("probe")
    assert entry["machine"] == {"cpu": {
        "arch": platform.machine(), "model": "Intel(R) Xeon(R) Platinum 8480+", "cpus": os.cpu_count(),
        "extensions": ["sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw",
                       "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]}}
    rebuilt, _ = _build_on(tmp_path, monkeypatch, "epyc", EPYC)
    # on the other machine the recorded build is still up to date: a copied build dir must not rebuild
    assert stale_reasons(spec, load_manifest(REPO / "qwen.toml"), recorded, Lock(recorded / "qwen.lock")) == []
    diffs, count = compare_locks(recorded, rebuilt)
    assert count == 1 and [(d.task, d.artifact, d.where) for d in diffs] == [("probe", "sums.txt", "line 1")]
    said = ("CPU: 'Intel(R) Xeon(R) Platinum 8480+' recorded, 'AMD EPYC 7B13' here",
            f"CPU extensions the kernels dispatch on: {XEON_ONLY} recorded, not here")
    assert diffs[0].machine == said
    assert str(diffs[0]).endswith("\n    recorded on another machine, whose kernels round differently: "
                                  + "; ".join(said))


def test_the_same_machine_is_not_mentioned(tmp_path, monkeypatch):
    recorded, _ = _build_on(tmp_path, monkeypatch, "one", EPYC)
    rebuilt, _ = _build_on(tmp_path, monkeypatch, "two", EPYC)
    assert compare_locks(recorded, rebuilt) == ([], 1)
    # a digest that differs for another reason says nothing of the machine
    (recorded / "sums.txt").write_text("kernel sse\n")
    Lock(recorded / "qwen.lock").record("probe", [recorded / "sums.txt"], {}, {"train.seed": 42}, {}, recorded,
                                        machine={"cpu": cpu_record()})
    [diff] = compare_locks(recorded, rebuilt)[0]
    assert diff.machine == () and "another machine" not in str(diff)


def test_machine_changes_in_words():
    here = {"cpu": {"arch": "x86_64", "model": "AMD EPYC", "extensions": ["avx", "avx2"], "cpus": 2},
            "fused_kernels": {"used": True, "compiler": "g++ (Debian 12.2.0-14) 12.2.0", "march": "znver3",
                              "flags": "-O3 -march=native"}}
    there = {"cpu": {"arch": "x86_64", "model": "AMD EPYC", "extensions": ["avx", "avx512f"], "cpus": 8},
             "fused_kernels": {"used": True, "compiler": "g++ (GCC) 13.2.0", "march": "znver4",
                               "flags": "-O3 -march=native"}}
    assert machine_changes(there, here) == (
        "CPUs (kernel threads): 8 recorded, 2 here",
        "CPU extensions the kernels dispatch on: avx512f recorded, not here and avx2 here only",
        "fused kernels' compiler: 'g++ (GCC) 13.2.0' recorded, 'g++ (Debian 12.2.0-14) 12.2.0' here",
        "fused kernels' -march=native: 'znver4' recorded, 'znver3' here")
    off = {**here, "fused_kernels": {"used": False, "why": "QWENBUILD_FUSED_KERNELS=0"}}
    assert machine_changes(here, off) == ("fused kernels: built by g++ (Debian 12.2.0-14) 12.2.0 for -march=native "
                                          "= znver3 recorded, not used (QWENBUILD_FUSED_KERNELS=0) here",)
    assert machine_changes(here, here) == () and machine_changes(here, None) == ()
    assert machine_changes(None, here) == ("qwen.lock has no machine record for it (written before qwen.lock "
                                           "recorded machines)",)
