"""What each rank holds under a parallel plan: per parameter group, the shard shape and element count.

The one home of per-stage parameter counts: `qwenbuild plan`'s shard table, the memory model and the export
topology's per-card figures all read `stage_groups`. Counts are computed from one layer's shapes times the layers
of a stage, so a plan of any size is counted at once.
"""

from __future__ import annotations

import dataclasses
import math

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import parameter_shapes, split_layer_name
from qwenbuild.parallel.plan_rules import check_plan, default_offset, stage_layers
from qwenbuild.parallel.ranks import place_ranks
from qwenbuild.parallel.strategy import split_dim, top_parameter_stages


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """Parameters of one kind on one rank: `layers.attention.wq.weight` (one per layer of the stage) or a
    parameter outside the layers (count 1)."""

    name: str
    count: int
    full_shape: tuple[int, ...]
    shard_shape: tuple[int, ...]

    @property
    def shard_elements(self) -> int:
        return math.prod(self.shard_shape)

    @property
    def elements(self) -> int:
        return self.count * self.shard_elements


def group_name(name: str) -> str:
    layer = split_layer_name(name)
    return f"layers.{layer[1]}" if layer else name


def model_parallel_shape(name: str, shape: tuple[int, ...], model_parallel: int, vocab_emb_dp: bool) -> tuple:
    """One rank's slice of a parameter: the dimension MindFormers splits by model_parallel, divided."""
    dim = split_dim(name, vocab_emb_dp)
    return tuple(s // model_parallel if d == dim else s for d, s in enumerate(shape))


def stage_groups(cfg: QwenConfig, model_parallel: int, vocab_emb_dp: bool,
                 stages: list[range]) -> list[list[ShardGroup]]:
    """Per pipeline stage, the parameter groups each of its ranks holds, in network order."""
    one_layer = parameter_shapes(dataclasses.replace(cfg, num_layers=1))
    last = len(stages) - 1
    out = []
    for stage, layers in enumerate(stages):
        groups = []
        for name, shape in one_layer.items():
            layer = split_layer_name(name)
            count = len(layers) if layer else int(stage in top_parameter_stages(name, last, cfg.tie_word_embeddings))
            if count:
                groups.append(ShardGroup(group_name(name), count, shape,
                                         model_parallel_shape(name, shape, model_parallel, vocab_emb_dp)))
        out.append(groups)
    return out


def stage_elements(groups: list[ShardGroup]) -> int:
    return sum(g.elements for g in groups)


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
    itemsize = ITEMSIZE[dtype or cfg.param_dtype]
    groups = [{g.name: {"count": g.count, "full_shape": list(g.full_shape), "shard_shape": list(g.shard_shape),
                        "bytes": g.elements * itemsize} for g in stage}
              for stage in stage_groups(cfg, model_parallel, vocab_emb_dp, stages)]
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
