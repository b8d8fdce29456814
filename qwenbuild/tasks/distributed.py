"""Tasks of the distributed plan: rank table, strategy files, per-rank shards, launch scripts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from qwenbuild.digests import json_digest
from qwenbuild.store import atomic_path
from qwenbuild.tasks._spec import Context, TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS

PLAN_KEYS = ("parallel.data_parallel", "parallel.model_parallel", "parallel.pipeline_stage",
             "parallel.vocab_emb_dp", "parallel.offset", "parallel.strategy_dir")
HARDWARE_KEYS = ("hardware.device", "hardware.devices_per_node", "hardware.nodes", "hardware.master_port",
                 "hardware.device_ip_source")


def node_devices(m) -> list[dict]:
    hw = m.data["hardware"]
    return [{"host": n["host"], "ip": n["ip"], "device_ids": n.get("device_ids") or list(range(hw["devices_per_node"])),
             **({"device_ips": n["device_ips"]} if n.get("device_ips") else {})} for n in hw["nodes"]]


def rank_table_file(m, lay) -> Path | None:
    """The merged RANK_TABLE_FILE of an Ascend topology (None on CPU, where msrun needs none)."""
    if m.data["hardware"]["device"] != "ascend":
        return None
    from qwenbuild.parallel.rank_table import merged_file_name

    hw = m.data["hardware"]
    shape = {"server_count": str(len(hw["nodes"])),
             "server_list": [{"device": [None] * hw["devices_per_node"]} for _ in hw["nodes"]]}
    return lay.rank_table / merged_file_name(shape)


def _rank_table(ctx: Context) -> None:
    from qwenbuild.parallel.rank_table import dumps, node_file_name, rank_table_for_nodes

    m = ctx.manifest
    tables, merged = rank_table_for_nodes(node_devices(m), m.data["hardware"]["device_ip_source"])
    with ctx.output_dir(ctx.layout.rank_table) as tmp:
        for table in tables:
            (tmp / node_file_name(table)).write_text(dumps(table), encoding="utf-8")
        (tmp / rank_table_file(m, ctx.layout).name).write_text(dumps(merged), encoding="utf-8")
    print(f"rank_table: {len(tables)} node table(s) + merged {rank_table_file(m, ctx.layout).name}", file=sys.stderr)


def _strategy(ctx: Context) -> None:
    from qwenbuild.parallel.strategy import collect_strategy_files, write_strategy_files

    m, par = ctx.manifest, ctx.manifest.data["parallel"]
    world = par["data_parallel"] * par["model_parallel"] * par["pipeline_stage"]
    with ctx.output_dir(ctx.layout.strategy) as tmp:
        if par.get("strategy_dir"):
            # strategy files compiled on Ascend (only_save_strategy) take precedence over synthesised ones
            for path in collect_strategy_files(m.path_of("parallel.strategy_dir"), world):
                shutil.copyfile(path, tmp / path.name)
        else:
            write_strategy_files(m.model, par["data_parallel"], par["model_parallel"], par["pipeline_stage"],
                                 tmp / "files", par["vocab_emb_dp"], par.get("offset", 0))
            for path in (tmp / "files").iterdir():
                path.rename(tmp / path.name)
            (tmp / "files").rmdir()
    print(f"strategy: {world} strategy file(s) -> {ctx.layout.strategy}", file=sys.stderr)


def _shard_key(lay) -> str:
    from qwenbuild.lock import Lock

    lock = Lock(lay.lock)
    return json_digest({"source": lock.digest_of(lay.converted, lay.root),
                        "strategy": lock.digest_of(lay.strategy, lay.root)})[7:19]


def _sealed_and_intact(directory: Path) -> bool:
    """A directory artifact whose members still have the digests its seal records (a damaged one is rebuilt)."""
    from qwenbuild.store import member_digests, read_seal

    sealed = read_seal(directory)
    return sealed is not None and sealed == member_digests(directory)


def _shard(ctx: Context) -> None:
    """Shards live in <name>-<content key>/; <name> links to the current layout, earlier layouts stay reusable."""
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.store import write_seal

    lay = ctx.layout
    keyed = lay.transformed.with_name(f"{lay.transformed.name}-{_shard_key(lay)}")
    if _sealed_and_intact(keyed):
        print(f"shard: reusing {keyed.name} (same checkpoint and strategy)", file=sys.stderr)
    else:
        with atomic_path(keyed, directory=True) as tmp:
            transform_ckpt("", lay.strategy, lay.converted, tmp)
            write_seal(tmp)
    with atomic_path(lay.transformed) as link:
        os.symlink(keyed.name, link)


def _launch(ctx: Context) -> None:
    from qwenbuild.parallel.launchers import launch_scripts, mode_env, write_launch_scripts

    m, lay = ctx.manifest, ctx.layout
    hw = m.data["hardware"]
    # msrun runs a script file, not a module: point at the package's entry scripts
    train_dir = Path(__file__).resolve().parents[1] / "train"
    if hw["device"] == "ascend":
        command = [str(train_dir / "mindformers_run.py"), "--config", str(lay.mindformers_yaml), "--run_mode",
                   "finetune"]
    else:
        command = [str(train_dir / "worker.py"), "--config", str(lay.run_json)]
    scripts = launch_scripts(node_devices(m), hw["devices_per_node"], command, device=hw["device"],
                             master_port=hw["master_port"], log_dir=str(lay.output / "msrun_log"),
                             env=mode_env("finetune", hw["device"]), python_bin_dir=Path(sys.executable).parent,
                             rank_table_file=rank_table_file(m, lay), workdir=str(lay.root))
    with ctx.output_dir(lay.launch) as tmp:
        write_launch_scripts(tmp, scripts)
    print(f"launch: {', '.join(sorted(scripts))} -> {lay.launch}", file=sys.stderr)


def specs(m, lay) -> list[TaskSpec]:
    ascend = m.data["hardware"]["device"] == "ascend"
    out = []
    if ascend:
        out.append(TaskSpec("rank_table", "RANK_TABLE_FILE per node and merged (hccl_tools + merge_hccl)",
                            _rank_table, keys=HARDWARE_KEYS, dir_outputs=[lay.rank_table]))
    else:
        out.append(TaskSpec("rank_table", "RANK_TABLE_FILE for Ascend topologies (a CPU topology needs none)",
                            lambda ctx: print("rank_table: a CPU topology needs no rank table; msrun uses "
                                              "--master_addr", file=sys.stderr),
                            keys=("hardware.device",)))
    strategy_inputs = []
    if m.data["parallel"].get("strategy_dir") and m.path_of("parallel.strategy_dir").is_dir():
        strategy_inputs = sorted(p for p in m.path_of("parallel.strategy_dir").iterdir() if p.is_file())
    out.append(TaskSpec("strategy", "one strategy file per rank for the parallel plan (or the ones compiled on "
                                    "Ascend)", _strategy, keys=MODEL_KEYS + PLAN_KEYS, inputs=strategy_inputs,
                        dir_outputs=[lay.strategy], packages=("mindspore",)))
    out.append(TaskSpec("shard", "slice the converted checkpoint per rank (transform_ckpt)", _shard,
                        inputs=[lay.converted, lay.sealed(lay.strategy)], dir_outputs=[lay.transformed],
                        packages=("mindspore",)))
    out.append(TaskSpec("launch", "msrun scripts per node and a Slurm sbatch script", _launch,
                        keys=HARDWARE_KEYS, dir_outputs=[lay.launch],
                        inputs=[lay.sealed(lay.rank_table)] if ascend else []))
    return out
