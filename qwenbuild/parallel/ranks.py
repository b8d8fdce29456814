"""Where each rank runs: the one rule from global rank to node, device, pipeline stage and parallel indices."""

from __future__ import annotations

import dataclasses

from qwenbuild.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rank:
    rank: int
    node: int
    device: int  # physical device id on its node
    stage: int
    dp_index: int
    mp_index: int


def place_ranks(data_parallel: int, model_parallel: int, pipeline_stage: int,
                node_devices: list[list[int]]) -> list[Rank]:
    """Ranks in rank-table order: node by node, device by device (msrun's RANK_ID = node_rank x local workers +
    local index); a pipeline stage holds data_parallel x model_parallel consecutive ranks, model_parallel fastest."""
    world = data_parallel * model_parallel * pipeline_stage
    slots = [(node, device) for node, ids in enumerate(node_devices) for device in ids]
    if len(slots) != world:
        raise UserError(f"the nodes hold {len(slots)} devices but dp x mp x pp = {world}")
    per_stage = data_parallel * model_parallel
    out = []
    for rank, (node, device) in enumerate(slots):
        stage, inner = divmod(rank, per_stage)
        out.append(Rank(rank, node, device, stage, inner // model_parallel, inner % model_parallel))
    return out
