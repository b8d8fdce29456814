"""What each rank holds under a parallel plan: per parameter group, the shard shape and bytes (for `qwenbuild plan`)."""

from __future__ import annotations

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import parameter_shapes, split_layer_name
from qwenbuild.parallel.plan_rules import check_plan, default_offset, stage_layers
from qwenbuild.parallel.ranks import place_ranks
from qwenbuild.parallel.strategy import parameter_stages, shard_shape, split_dim, tensor_layout


def group_name(name: str) -> str:
    layer = split_layer_name(name)
    return f"layers.{layer[1]}" if layer else name


def _stage_groups(cfg: QwenConfig, stage: int, where: dict, data_parallel: int, model_parallel: int,
                  vocab_emb_dp: bool, itemsize: int) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for name, shape in parameter_shapes(cfg).items():
        if stage not in where[name]:
            continue
        layout = tensor_layout(shape, split_dim(name, vocab_emb_dp), data_parallel, model_parallel)
        part = shard_shape(shape, layout["dev_matrix"], layout["tensor_map"])
        g = groups.setdefault(group_name(name), {"count": 0, "full_shape": list(shape), "shard_shape": part,
                                                 "bytes": 0})
        g["count"] += 1
        n = itemsize
        for d in part:
            n *= d
        g["bytes"] += n
    return groups


def rank_shards(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
                vocab_emb_dp: bool = False, offset: int | list[int] = 0,
                node_devices: list[list[int]] | None = None, dtype: str | None = None) -> list[dict]:
    """Per rank: node, device, stage, layers and, per parameter group, the shard shape and bytes.

    node_devices lists the physical device ids of each node in rank order (default: one node with every rank).
    """
    check_plan(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp, offset)
    world = data_parallel * model_parallel * pipeline_stage
    ranks = place_ranks(data_parallel, model_parallel, pipeline_stage, node_devices or [list(range(world))])
    stages = stage_layers(cfg.num_layers, pipeline_stage, offset)
    where = parameter_stages(cfg, stages)
    itemsize = ITEMSIZE[dtype or cfg.param_dtype]
    groups = [_stage_groups(cfg, s, where, data_parallel, model_parallel, vocab_emb_dp, itemsize)
              for s in range(pipeline_stage)]
    return [{"rank": r.rank, "node": r.node, "device": r.device, "stage": r.stage,
             "layers": [stages[r.stage].start, stages[r.stage].stop - 1] if len(stages[r.stage]) else [],
             "model_parallel_index": r.mp_index, "groups": groups[r.stage],
             "bytes": sum(g["bytes"] for g in groups[r.stage].values())} for r in ranks]


def shard_table(cfg: QwenConfig, parallel: dict, device_count: int | None = None, dtype: str | None = None) -> str:
    """Text for `qwenbuild plan`: per pipeline stage (its ranks hold the same shapes), each group's shard and bytes."""
    dp, mp, pp = parallel["data_parallel"], parallel["model_parallel"], parallel["pipeline_stage"]
    offset = parallel.get("offset") or default_offset(cfg.num_layers, pp)
    shards = rank_shards(cfg, dp, mp, pp, bool(parallel.get("vocab_emb_dp", False)), offset, dtype=dtype)
    if device_count is not None and device_count != len(shards):
        raise UserError(f"the plan has {len(shards)} ranks but the hardware {device_count} devices")
    lines = ["shards per rank     group                                 count  shard shape        MiB/rank"]
    per_stage = dp * mp
    for s in range(pp):
        first = shards[s * per_stage]
        ranks = f"ranks {s * per_stage}-{(s + 1) * per_stage - 1}" if per_stage > 1 else f"rank {s}"
        head = f"stage {s} {ranks}"
        for name, g in first["groups"].items():
            shape = "x".join(map(str, g["shard_shape"]))
            lines.append(f"{head:19s} {name:37s} {g['count']:5d}  {shape:17s} {g['bytes'] / 2**20:9.1f}")
            head = ""
        lines.append(f"{'':19s} {'total, layers ' + '-'.join(map(str, first['layers'])):37s} {'':5s}  {'':17s} "
                     f"{first['bytes'] / 2**20:9.1f}")
    return "\n".join(lines)
