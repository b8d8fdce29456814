"""Show the plan of qwen.toml without running anything: where each rank runs (node, device, stage), the memory of
every device by component (training ranks and a card of the export topology), and which build tasks are out of
date and why. `--json` prints all of it as one JSON document."""

from __future__ import annotations

import json

from qwenbuild.commands import add_manifest_argument
from qwenbuild.manifest import load_manifest
from qwenbuild.model.lora import trainable_parameters
from qwenbuild.model.params import num_parameters
from qwenbuild.parallel.memory import GIB
from qwenbuild.parallel.shard_sizes import shard_table
from qwenbuild.plan import export_memory, lora_devices_line, memory_estimate, memory_warnings, plan_json, ranks
from qwenbuild.tasks.staleness import task_status


def add_arguments(parser):
    add_manifest_argument(parser)
    parser.add_argument("--no-status", action="store_true", help="skip the task status (no build dir access)")
    parser.add_argument("--json", action="store_true", help="print the whole plan as JSON (bytes, with dtypes)")


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def _memory_rows(rows) -> list[str]:
    names = []
    for row in rows:
        names += [c.name for c in row.components if c.name not in names]
    width = max(len(row.label) for row in rows)
    lines = [f"{'':{width}s} {'params(M)':>9s} " + " ".join(f"{n:>11s}" for n in names) + "     total  / limit  free"]
    for row in rows:
        cells = [f"{_gib(row.component(n).bytes):>11s}" if n in [c.name for c in row.components] else f"{'':11s}"
                 for n in names]
        flag = "  DOES NOT FIT" if row.total > row.limit else ""
        lines.append(f"{row.label:{width}s} {row.params / 1e6:9.1f} " + " ".join(cells)
                     + f" {_gib(row.total)} / {row.limit / GIB:<5g} {row.headroom:5.0%}{flag}")
    dtypes = {}
    for row in rows:
        for c in row.components:
            dtypes.setdefault(c.name, f"{c.name}: {c.dtype}, {c.what}")
    return lines + [f"  {text}" for text in dtypes.values()]


def trainable_line(m) -> str:
    """How many parameters get gradients and AdamW moments under train.method."""
    cfg, lora = m.model.config, m.train.lora_config
    total = num_parameters(cfg)
    if lora is None:
        return f"train.method = \"full\": all {total / 1e9:.3f}B parameters train, with gradients and AdamW moments"
    trainable = trainable_parameters(cfg, lora)
    return (f"train.method = \"lora\": {trainable / 1e6:.2f}M trainable parameters ({100 * trainable / total:.3f}% of "
            f"{total / 1e9:.3f}B): rank {lora.rank} adapters on {', '.join(lora.targets)}, scale alpha / rank = "
            f"{lora.scale:g}; the frozen weights get no gradients or AdamW moments")


def main(args):
    m = load_manifest(args.config)
    if args.json:
        print(json.dumps(plan_json(m, None if args.no_status else task_status(m)), indent=1))
        return
    par, hw = m.parallel, m.hardware
    print(f"{m.path}: {num_parameters(m.model.config) / 1e9:.3f}B parameters; {len(hw.nodes)} node(s) x "
          f"{hw.devices_per_node} {hw.device} devices; dp {par.data_parallel} x mp {par.model_parallel} "
          f"x pp {par.pipeline_stage}")
    print(trainable_line(m))
    print("\nrank  node  host              device  stage  dp  mp  layers")
    for p in ranks(m):
        r = p.rank
        print(f"{r.rank:4d}  {r.node:4d}  {p.host[:16]:16s}  {r.device:6d}  {r.stage:5d}  {r.dp_index:2d}  "
              f"{r.mp_index:2d}  {p.layers.start}-{p.layers.stop - 1}")
    print("\n" + shard_table(m.model.config, m.value("parallel"), hw.device_count))
    print("\nmemory per training device (GiB)")
    print("\n".join(_memory_rows(memory_estimate(m))))
    if lora_devices_line(m):
        print(lora_devices_line(m))
    ex = m.export
    print(f"\nmemory per card of the export topology (GiB): dp 1 x mp {ex.model_parallel}, export.seq_length "
          f"{ex.seq_length} x batch {ex.batch_size}")
    print("\n".join(_memory_rows([export_memory(m)])))
    for w in m.unavailable:
        print(f"missing: {w}")
    for w in m.warnings:
        print(f"warning: {w}")
    for w in memory_warnings(m):
        print(f"warning: {w}")
    if args.no_status:
        return
    print("\ntask             status      why")
    for name, state, reasons in task_status(m):
        print(f"{name:16s} {state:11s} {'; '.join(reasons)}")
