"""Show the plan of qwen.toml without running anything: where each rank runs (node, device, stage), the memory
estimate per device, and which build tasks are out of date and why."""

from __future__ import annotations

from qwenbuild.commands import add_manifest_argument
from qwenbuild.manifest import load_manifest
from qwenbuild.model.lora import trainable_parameters
from qwenbuild.model.params import num_parameters
from qwenbuild.parallel.shard_sizes import shard_table
from qwenbuild.plan import memory_estimate, memory_warnings, ranks
from qwenbuild.tasks.staleness import task_status


def add_arguments(parser):
    add_manifest_argument(parser)
    parser.add_argument("--no-status", action="store_true", help="skip the task status (no build dir access)")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):8.2f}"


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
    print("\nmemory per device (GiB)  stage  params(M)  weights  gradients  optimizer  activations  total  / device")
    for row in memory_estimate(m):
        flag = "  DOES NOT FIT" if row["total"] > row["device"] else ""
        print(f"{'':24s} {row['stage']:5d}  {row['params'] / 1e6:9.1f} {_gib(row['weights'])} {_gib(row['gradients'])}"
              f"   {_gib(row['optimizer'])}    {_gib(row['activations'])} {_gib(row['total'])}  "
              f"/ {row['device'] / (1 << 30):g}{flag}")
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
