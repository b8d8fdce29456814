"""Tasks of the distributed plan: rank table, strategy files, per-rank shards, launch scripts."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from qwenbuild.digests import json_digest
from qwenbuild.lock import Lock, check_sealed
from qwenbuild.parallel.launch_scripts import launch_scripts, mode_env, write_launch_scripts
from qwenbuild.parallel.rank_table import dumps, merged_name, node_file_name, rank_table_for_nodes
from qwenbuild.parallel.reshard import transform_ckpt
from qwenbuild.parallel.strategy import collect_strategy_files, strategy_files, weight_layouts_digest
from qwenbuild.store import atomic_path
from qwenbuild.tasks.context import Context
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.tasks.weights import MODEL_KEYS
from qwenbuild.train.msrun import no_tail

logger = logging.getLogger(__name__)

PLAN_KEYS = ("parallel.data_parallel", "parallel.model_parallel", "parallel.pipeline_stage",
             "parallel.vocab_emb_dp", "parallel.offset", "parallel.strategy_dir")
HARDWARE_KEYS = ("hardware.device", "hardware.devices_per_node", "hardware.nodes", "hardware.master_port",
                 "hardware.device_ip_source")
# what msrun starts on each worker, by train.engine
WORKER_MODULE = {"qwenbuild": "qwenbuild.train.worker", "mindformers": "qwenbuild.train.mindformers_run"}


def node_devices(m) -> list[dict]:
    hw = m.hardware
    return [{"host": n.host, "ip": n.ip, "device_ids": hw.device_ids(n),
             **({"device_ips": list(n.device_ips)} if n.device_ips else {}),
             **({"rank_table": str(m.resolve(n.rank_table))} if n.rank_table else {})} for n in hw.nodes]


def rank_table_file(m, build) -> Path | None:
    """The merged RANK_TABLE_FILE of an Ascend topology (None on CPU, where msrun needs none)."""
    hw = m.hardware
    return build.rank_table / merged_name(len(hw.nodes), hw.device_count) if hw.device == "ascend" else None


def workers_per_node(m) -> int:
    """msrun workers a node starts: one per device, except that a CPU worker runs every pipeline stage of its
    data/model-parallel slice (CPU has no send/receive between processes)."""
    hw = m.hardware
    return hw.devices_per_node // m.parallel.pipeline_stage if hw.device == "cpu" else hw.devices_per_node


def in_build(build, path: Path, start: Path | None = None) -> str:
    """A build-dir path as generated files name it: relative to the build dir, or to `start` (a directory inside it),
    where the script that reads it runs, so a copied project's files never name the original's."""
    rel = Path(path).relative_to(build.root)
    return Path(os.path.relpath(rel, Path(start).relative_to(build.root))).as_posix() if start else rel.as_posix()


def _rank_table(ctx: Context) -> None:
    m = ctx.manifest
    tables, merged = rank_table_for_nodes(node_devices(m), m.hardware.device_ip_source)
    with ctx.output_dir(ctx.build.rank_table) as tmp:
        for table in tables:
            (tmp / node_file_name(table)).write_text(dumps(table), encoding="utf-8")
        (tmp / rank_table_file(m, ctx.build).name).write_text(dumps(merged), encoding="utf-8")
    logger.info(f"rank_table: {len(tables)} node table(s) + merged {rank_table_file(m, ctx.build).name}")


def _strategy(ctx: Context) -> None:
    m, par = ctx.manifest, ctx.manifest.parallel
    with ctx.output_dir(ctx.build.strategy) as tmp:
        if par.strategy_dir:
            # strategy files compiled on Ascend (only_save_strategy) take precedence over synthesised ones
            for path in collect_strategy_files(m.path_of("parallel.strategy_dir"), par.world_size):
                shutil.copyfile(path, tmp / path.name)
        else:
            files = strategy_files(m.model.config, par.data_parallel, par.model_parallel, par.pipeline_stage,
                                   par.vocab_emb_dp, par.stage_offset, lora_targets(m))
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
    logger.info(f"strategy: {par.world_size} strategy file(s) -> {ctx.build.strategy}")


def lora_targets(m) -> tuple[str, ...]:
    """The projections that carry LoRA adapters (none for a full fine-tune)."""
    return tuple(m.value("train.lora.targets")) if m.value("train.method") == "lora" else ()


def lora_keys(m, *keys: str) -> tuple[str, ...]:
    """train.method, and the given train.lora keys when it is "lora": a LoRA setting matters only then."""
    return ("train.method",) + (keys if m.train.method == "lora" else ())


def keyed_dir(build, link: Path, sources: dict, make, label: str) -> None:
    """A directory cached by the content of its sources: it lives in <name>-<key>/ and <name> links to it, so an
    earlier layout stays reusable. `make(tmp)` fills a new one; `sources` maps names to digests."""
    keyed = link.with_name(f"{link.name}-{json_digest(sources)[7:19]}")
    if check_sealed(keyed, Lock(build.lock).read_stats()) is None:
        logger.info(f"{label}: reusing {keyed.name} (same inputs)")
    else:
        with atomic_path(keyed, directory=True) as tmp:
            make(tmp)
    with atomic_path(link, link=True) as tmp_link:
        os.symlink(keyed.name, tmp_link)


def _shard(ctx: Context) -> None:
    build = ctx.build
    lock = Lock(build.lock)
    # the weights' layouts only: adapters added to the strategy files leave the base shards as they are
    keyed_dir(build, build.transformed, {"source": lock.digest_of(build.converted, build.root),
                                         "strategy": weight_layouts_digest(build.strategy)},
              lambda tmp: transform_ckpt(src_ckpt_strategy=None, dst_ckpt_strategy=build.strategy,
                                         src_ckpt_dir=build.converted, dst_ckpt_dir=tmp), "shard")


def node_packages(m) -> tuple[str, ...]:
    """What every node runs, whose versions the lock records and node_check compares: qwenbuild and MindSpore, and
    MindFormers when it trains."""
    mindformers = m.train.engine_on(m.hardware.device) == "mindformers"
    return ("qwenbuild", "mindspore") + (("mindformers",) if mindformers else ())


def node_scripts(m, build) -> dict[str, str]:
    """node_K.sh and slurm.sbatch for the manifest's cluster: each node checks itself (node_check), then runs msrun
    with the training engine's worker module on the nodes' own Python."""
    hw = m.hardware
    engine = m.train.engine_on(hw.device)
    config = build.mindformers_yaml if engine == "mindformers" else build.run_json
    command = ["-m", WORKER_MODULE[engine], "--config", in_build(build, config)] + (
        ["--run_mode", "finetune"] if engine == "mindformers" else [])
    local = workers_per_node(m)
    # the scripts run in the build dir ("."): node_K.sh finds it from its own place, slurm.sbatch (which Slurm runs
    # from a copy) names its path
    check = ["qwenbuild.train.node_check", "--build_dir", ".", "--node", "{node}", "--host", "{host}",
             "--ip", "{ip}", "--workers", str(local), "--toolchain_of", "launch"] + [
        in_build(build, p) for p in (config, build.mindrecord, build.transformed)]
    table = rank_table_file(m, build)
    return launch_scripts(node_devices(m), local, command, device=hw.device, master_port=hw.master_port,
                          log_dir=in_build(build, build.msrun_log), env=mode_env("finetune", hw.device),
                          python=hw.python, env_script=hw.env_script,
                          rank_table_file=table and in_build(build, table), workdir=str(build.root),
                          workdir_from_script="..",
                          tail_worker_log=no_tail(hw.devices_per_node) if hw.device == "cpu" else None, check=check)


def _launch(ctx: Context) -> None:
    build = ctx.build
    scripts = node_scripts(ctx.manifest, build)
    with ctx.output_dir(build.launch) as tmp:
        write_launch_scripts(tmp, scripts)
    logger.info(f"launch: {', '.join(sorted(scripts))} -> {build.launch}")


def specs(m, build) -> list[TaskSpec]:
    ascend = m.hardware.device == "ascend"
    out = []
    if ascend:
        node_tables = [m.resolve(n.rank_table) for n in m.hardware.nodes if n.rank_table and not n.device_ips]
        out.append(TaskSpec("rank_table", "RANK_TABLE_FILE per node and merged (hccl_tools + merge_hccl)",
                            _rank_table, keys=HARDWARE_KEYS, inputs=node_tables, dir_outputs=[build.rank_table]))
    else:
        out.append(TaskSpec("rank_table", "RANK_TABLE_FILE for Ascend topologies (a CPU topology needs none)",
                            lambda ctx: logger.info("rank_table: a CPU topology needs no rank table; msrun uses "
                                                    "--master_addr"),
                            keys=("hardware.device",)))
    strategy_dir = m.path_of("parallel.strategy_dir")
    strategy_inputs = sorted(p for p in strategy_dir.iterdir() if p.is_file()) if strategy_dir else []
    out.append(TaskSpec("strategy", "one strategy file per rank for the parallel plan (or the ones compiled on "
                                    "Ascend)", _strategy, keys=MODEL_KEYS + PLAN_KEYS
                        + lora_keys(m, "train.lora.targets"), inputs=strategy_inputs,
                        dir_outputs=[build.strategy], packages=("mindspore",)))
    out.append(TaskSpec("shard", "slice the converted checkpoint per rank (transform_ckpt)", _shard,
                        inputs=[build.converted, build.strategy], dir_outputs=[build.transformed],
                        packages=("mindspore",)))
    out.append(TaskSpec("launch", "msrun scripts per node and a Slurm sbatch script", _launch,
                        keys=HARDWARE_KEYS + ("hardware.python", "hardware.env_script", "train.engine",
                                              "parallel.pipeline_stage"), dir_outputs=[build.launch],
                        inputs=[build.rank_table] if ascend else [], packages=node_packages(m),
                        names_build_dir=True))
    return out
