"""The parallel plan on the manifest's hardware: where each rank runs, and the memory of every device."""

from __future__ import annotations

import dataclasses

from qwenbuild.manifest import deployment_dtype, device_limit
from qwenbuild.model.lora import trainable_parameters
from qwenbuild.model.params import num_parameters
from qwenbuild.parallel.memory import GIB, HEADROOM, DeviceMemory, TrainingPlan, deployment_memory, one_process, \
    training_memory
from qwenbuild.parallel.plan_rules import default_offset, plan_problems, stage_layers
from qwenbuild.parallel.ranks import Rank, place_ranks
from qwenbuild.parallel.shard_sizes import rank_shards
from qwenbuild.train.mindformers_yaml import PARAM_INIT_TYPE


@dataclasses.dataclass(frozen=True)
class PlacedRank:
    rank: Rank
    host: str
    layers: range


def pipeline_layers(m) -> list[range]:
    """Layers of each pipeline stage, by MindFormers' rule (parallel.offset spells out an uneven split)."""
    return stage_layers(m.model.num_layers, m.parallel.pipeline_stage, m.parallel.stage_offset)


def ranks(m) -> list[PlacedRank]:
    """Every rank of the plan with its node's host name and its layers."""
    hw, par = m.hardware, m.parallel
    stages = pipeline_layers(m)
    placed = place_ranks(par.data_parallel, par.model_parallel, par.pipeline_stage,
                         [hw.device_ids(node) for node in hw.nodes])
    return [PlacedRank(r, hw.nodes[r.node].host, stages[r.stage]) for r in placed]


def training_plan(m) -> TrainingPlan:
    """What the run allocates: on Ascend MindFormers' Trainer on the generated YAML (float32 master weights,
    recompute and sequence parallelism as [parallel] says, flash attention, the parallel optimizer); on CPU the
    engine that trains there, in float32."""
    cfg, par, hw = m.model.config, m.parallel, m.hardware
    ascend = hw.device == "ascend"
    mindformers = m.train.engine_on(hw.device) == "mindformers"
    return TrainingPlan(
        data_parallel=par.data_parallel, model_parallel=par.model_parallel, pipeline_stage=par.pipeline_stage,
        micro_batch_num=par.micro_batch_num, vocab_emb_dp=par.vocab_emb_dp,
        use_seq_parallel=ascend and par.use_seq_parallel, recompute=ascend and par.recompute,
        seq_length=m.dataset.seq_length, batch_size=m.train.batch_size,
        weight_dtype=PARAM_INIT_TYPE if mindformers else cfg.param_dtype,
        compute_dtype=cfg.compute_dtype if ascend else "float32", flash_attention=ascend, parallel_optimizer=ascend,
        lora=m.train.lora_config)


def memory_estimate(m) -> list[DeviceMemory]:
    """Per pipeline stage, the memory of one of its ranks; on CPU one row, as a worker runs every stage."""
    rows = training_memory(m.model.config, training_plan(m), pipeline_layers(m), device_limit(m))
    return [one_process(rows)] if m.hardware.device == "cpu" and len(rows) > 1 else rows


def fewest_devices(m, lora: bool) -> tuple[int, int] | None:
    """(model_parallel, pipeline_stage) of the plan with the fewest devices (data_parallel 1, model_parallel within
    a node, layers split evenly or by MindFormers' default offset, no more devices than the manifest has) whose
    every stage fits, for LoRA or a full fine-tune; None when none does."""
    cfg, par = m.model.config, m.parallel
    plan = dataclasses.replace(training_plan(m), data_parallel=1, lora=m.train.lora_config if lora else None)
    if lora and plan.lora is None:
        return None
    # within the manifest's devices: more than it has is no answer to how few it needs
    choices = sorted((mp * pp, pp, mp) for mp in range(1, m.hardware.devices_per_node + 1)
                     for pp in range(1, min(cfg.num_layers, m.hardware.device_count // mp) + 1))
    for _, pp, mp in choices:
        if plan_problems(cfg, 1, mp, pp, par.vocab_emb_dp, default_offset(cfg.num_layers, pp)):
            continue
        stages = stage_layers(cfg.num_layers, pp, default_offset(cfg.num_layers, pp))
        rows = training_memory(cfg, dataclasses.replace(plan, model_parallel=mp, pipeline_stage=pp,
                                                        micro_batch_num=max(par.micro_batch_num, pp)),
                               stages, device_limit(m))
        if all(row.total <= row.limit for row in rows):
            return mp, pp
    return None


def lora_devices_line(m) -> str | None:
    """On Ascend under LoRA: how few devices the adapters need, against a full fine-tune of the same model."""
    if m.hardware.device != "ascend" or m.train.lora_config is None:
        return None
    fits, full = fewest_devices(m, True), fewest_devices(m, False)

    def say(p):
        return f"dp 1 x mp {p[0]} x pp {p[1]} ({p[0] * p[1]} devices)" if p else "no plan on the manifest's devices"

    return (f"fewest devices that fit: LoRA {say(fits)}, a full fine-tune {say(full)} (memory as estimated above, "
            f"train.batch_size {m.train.batch_size} x seq_length {m.dataset.seq_length})")


def export_memory(m) -> DeviceMemory:
    """One card of the export (predict) topology."""
    ex = m.export
    return deployment_memory(m.model.config, ex.model_parallel, m.parallel.vocab_emb_dp, ex.seq_length,
                             ex.batch_size, deployment_dtype(m), m.hardware.device == "ascend", device_limit(m))


def _limit_text(m) -> str:
    if m.hardware.device == "ascend":
        return (f"max_device_memory {device_limit(m) / GIB:g}GB (hardware.device_memory_gb "
                f"{m.hardware.device_memory_gb:g} less the runtime's reserve)")
    return f"hardware.device_memory_gb {m.hardware.device_memory_gb:g}"


def memory_warnings(m) -> list[str]:
    """A training device over its memory or with less than HEADROOM of it left: the estimate is not exact."""
    out = []
    for row in memory_estimate(m):
        need = f"{row.label}: estimated {row.total / GIB:.1f} GiB per device"
        if row.total > row.limit:
            out.append(f"{need} exceeds {_limit_text(m)}; raise parallel.model_parallel or pipeline_stage, turn on "
                       "parallel.recompute or use_seq_parallel, or lower train.batch_size")
        elif row.headroom < HEADROOM:
            out.append(f"{need} leaves {row.headroom:.1%} of {_limit_text(m)} free (under {HEADROOM:.0%}): the "
                       "activations are an estimate, so the run may not fit")
    return out


def plan_json(m, tasks: list | None = None) -> dict:
    """The whole plan, machine-readable: the topology, every rank, the shards per stage, memory per device by
    component (bytes and dtype) for training and for the export topology, warnings, and the tasks' status."""
    cfg, par, hw = m.model.config, m.parallel, m.hardware
    shards = rank_shards(cfg, par.data_parallel, par.model_parallel, par.pipeline_stage, par.vocab_emb_dp,
                         par.stage_offset, [hw.device_ids(n) for n in hw.nodes])
    per_stage = par.data_parallel * par.model_parallel
    return {
        "manifest": str(m.path),
        "model": {"parameters": num_parameters(cfg), "param_dtype": cfg.param_dtype,
                  "compute_dtype": cfg.compute_dtype},
        "hardware": {"device": hw.device, "nodes": len(hw.nodes), "devices_per_node": hw.devices_per_node,
                     "device_memory_gb": hw.device_memory_gb, "limit_bytes": device_limit(m)},
        "parallel": {"data_parallel": par.data_parallel, "model_parallel": par.model_parallel,
                     "pipeline_stage": par.pipeline_stage, "micro_batch_num": par.micro_batch_num,
                     "vocab_emb_dp": par.vocab_emb_dp, "use_seq_parallel": par.use_seq_parallel,
                     "recompute": par.recompute},
        "ranks": [{"rank": p.rank.rank, "node": p.rank.node, "host": p.host, "device": p.rank.device,
                   "stage": p.rank.stage, "dp_index": p.rank.dp_index, "mp_index": p.rank.mp_index,
                   "layers": [p.layers.start, p.layers.stop - 1] if len(p.layers) else []} for p in ranks(m)],
        "shards": [{"stage": s, "ranks": [s * per_stage, (s + 1) * per_stage - 1], "dtype": cfg.param_dtype,
                    "groups": shards[s * per_stage]["groups"], "bytes": shards[s * per_stage]["bytes"]}
                   for s in range(par.pipeline_stage)],
        "memory": {"training": [row.to_json() for row in memory_estimate(m)],
                   "export": dict(export_memory(m).to_json(), model_parallel=m.export.model_parallel,
                                  seq_length=m.export.seq_length, batch_size=m.export.batch_size)},
        "trainable_parameters": trainable_parameters(cfg, m.train.lora_config),
        **({"fewest_devices": {method: dict(zip(("model_parallel", "pipeline_stage"), p)) if p else None
                               for method, p in (("lora", fewest_devices(m, True)),
                                                 ("full", fewest_devices(m, False)))}}
           if m.hardware.device == "ascend" and m.train.lora_config else {}),
        "warnings": [str(w) for w in m.warnings] + memory_warnings(m),
        "missing": [str(w) for w in m.unavailable],
        **({"tasks": [{"name": name, "status": state, "why": reasons} for name, state, reasons in tasks]}
           if tasks is not None else {}),
    }
