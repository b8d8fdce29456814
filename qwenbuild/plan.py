"""The parallel plan on the manifest's hardware: where each rank runs, and a per-device memory estimate."""

from __future__ import annotations

import dataclasses

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.model.config import QwenConfig
from qwenbuild.parallel.plan_rules import stage_layers
from qwenbuild.parallel.ranks import Rank, place_ranks

GIB = 1 << 30


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


def _stage_params(cfg: QwenConfig, layers: int, first: bool, last: bool, mp: int, vocab_emb_dp: bool) -> float:
    h, hd = cfg.hidden_size, cfg.head_dim
    per_layer = (2 * cfg.num_heads * hd * h + 2 * cfg.n_kv_heads * hd * h + 3 * h * cfg.intermediate_size) / mp
    per_layer += (cfg.num_heads + 2 * cfg.n_kv_heads) * hd / mp + 2 * h
    table = cfg.vocab_size * h / (1 if vocab_emb_dp else mp)
    total = layers * per_layer
    if first:
        total += table
    if last:
        total += h + (0 if cfg.tie_word_embeddings and first else table)
    return total


def memory_estimate(m) -> list[dict]:
    """Per pipeline stage, bytes per device: weights, gradients, AdamW states and activations of one step."""
    cfg, par, hw = m.model.config, m.parallel, m.hardware
    dp, mp, pp = par.data_parallel, par.model_parallel, par.pipeline_stage
    tokens = m.dataset.seq_length * m.train.batch_size
    pbytes = ITEMSIZE[cfg.param_dtype]
    abytes = 4 if hw.device == "cpu" else ITEMSIZE[cfg.compute_dtype]
    h = cfg.hidden_size
    rows = []
    for stage, layers in enumerate(pipeline_layers(m)):
        params = _stage_params(cfg, len(layers), stage == 0, stage == pp - 1, mp, par.vocab_emb_dp)
        weights = params * pbytes
        grads = params * 4  # gradients accumulate in float32
        # AdamW m and v in float32, sharded across data parallel by the parallel optimizer on Ascend
        optimizer = params * 8 / (dp if hw.device == "ascend" else 1)
        if par.recompute:
            per_layer = tokens * h * abytes
        else:
            per_layer = tokens * (h * 17 + cfg.intermediate_size * 3) * abytes / mp
        in_flight = min(pp - stage, par.micro_batch_num) if pp > 1 else 1
        activations = per_layer * len(layers) * in_flight
        if stage == pp - 1:
            activations += tokens * cfg.vocab_size * 4 * 2 / (1 if par.vocab_emb_dp else mp)
        total = weights + grads + optimizer + activations
        rows.append(dict(stage=stage, layers=layers, params=params, weights=weights, gradients=grads,
                         optimizer=optimizer, activations=activations, total=total,
                         device=hw.device_memory_gb * GIB))
    return rows


def memory_warnings(m) -> list[str]:
    return [f"pipeline stage {r['stage']}: estimated {r['total'] / GIB:.1f} GiB per device exceeds "
            f"hardware.device_memory_gb {r['device'] / GIB:g}" for r in memory_estimate(m) if r["total"] > r["device"]]
