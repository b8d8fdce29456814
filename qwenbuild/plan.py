"""The parallel plan: rank layout over nodes, divisibility rules, and a per-device memory estimate."""

from __future__ import annotations

import dataclasses

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.errors import UserError
from qwenbuild.tokenizer.files import QWEN_VOCAB_SIZE
from qwenbuild.model.config import QwenConfig
from qwenbuild.parallel.strategy import indivisible_dims

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Rank:
    rank: int
    node: int
    host: str
    device: int
    stage: int
    layers: range
    dp_index: int
    mp_index: int


def stage_layers(m) -> list[range]:
    """Layers of each pipeline stage, by MindFormers' rule (parallel.offset spells out an uneven split)."""
    from qwenbuild.parallel.strategy import stage_layers as split

    par = m.data["parallel"]
    return split(m.model.num_layers, par["pipeline_stage"], par.get("offset", 0))


def rank_layout(m) -> list[Rank]:
    """Global ranks in rank-table order: node by node; inside a stage, model_parallel varies fastest."""
    hw, par = m.data["hardware"], m.data["parallel"]
    dp, mp, pp = par["data_parallel"], par["model_parallel"], par["pipeline_stage"]
    per_stage = dp * mp
    stages = stage_layers(m)
    out = []
    for rank in range(dp * mp * pp):
        node, local = divmod(rank, hw["devices_per_node"])
        entry = hw["nodes"][node] if node < len(hw["nodes"]) else {"host": "?"}
        ids = entry.get("device_ids") or list(range(hw["devices_per_node"]))
        stage, inner = divmod(rank, per_stage)
        out.append(Rank(rank, node, entry["host"], ids[local] if local < len(ids) else local, stage,
                        stages[stage], inner // mp, inner % mp))
    return out


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
    cfg, par, train = m.model, m.data["parallel"], m.data["train"]
    dp, mp, pp = par["data_parallel"], par["model_parallel"], par["pipeline_stage"]
    seq, batch = m.data["dataset"]["seq_length"], train["batch_size"]
    pbytes = ITEMSIZE[cfg.param_dtype]
    abytes = 4 if m.data["hardware"]["device"] == "cpu" else ITEMSIZE[cfg.compute_dtype]
    h = cfg.hidden_size
    rows = []
    for stage, layers in enumerate(stage_layers(m)):
        params = _stage_params(cfg, len(layers), stage == 0, stage == pp - 1, mp, par["vocab_emb_dp"])
        weights = params * pbytes
        grads = params * 4  # gradients accumulate in float32
        # AdamW m and v in float32, sharded across data parallel by the parallel optimizer on Ascend
        optimizer = params * 8 / (dp if m.data["hardware"]["device"] == "ascend" else 1)
        tokens = seq * batch
        if par["recompute"]:
            per_layer = tokens * h * abytes
        else:
            per_layer = tokens * (h * 17 + cfg.intermediate_size * 3) * abytes / mp
        in_flight = min(pp - stage, par["micro_batch_num"]) if pp > 1 else 1
        activations = per_layer * len(layers) * in_flight
        if stage == pp - 1:
            activations += tokens * cfg.vocab_size * 4 * 2 / (1 if par["vocab_emb_dp"] else mp)
        total = weights + grads + optimizer + activations
        rows.append(dict(stage=stage, layers=layers, params=params, weights=weights, gradients=grads,
                         optimizer=optimizer, activations=activations, total=total,
                         device=m.data["hardware"]["device_memory_gb"] * GIB))
    return rows


def plan_problems(m) -> list[tuple[str, str]]:
    """Rules the schema cannot express, as (key path, message)."""
    cfg, par, hw = m.model, m.data["parallel"], m.data["hardware"]
    dp, mp, pp = par["data_parallel"], par["model_parallel"], par["pipeline_stage"]
    out = []
    devices = m.device_count
    if dp * mp * pp != devices:
        out.append(("parallel.data_parallel",
                    f"data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = {dp * mp * pp}, but the "
                    f"hardware has {devices} devices ({len(hw['nodes'])} node(s) x {hw['devices_per_node']} "
                    "devices_per_node); make the product equal the device count"))
    for name, value in indivisible_dims(cfg, mp, par["vocab_emb_dp"]):
        hint = "; set parallel.vocab_emb_dp = true or pad the vocabulary" if name == "vocab_size" else ""
        out.append(("parallel.model_parallel", f"model.{name} {value} is not divisible by model_parallel {mp}{hint}"))
    if pp > cfg.num_layers:
        out.append(("parallel.pipeline_stage", f"pipeline_stage {pp} exceeds model.num_layers {cfg.num_layers}: "
                                               "every stage needs at least one layer"))
    else:
        try:
            stage_layers(m)
        except UserError as exc:
            out.append(("parallel.offset" if "offset" in par else "parallel.pipeline_stage", str(exc)))
    if pp > 1 and par["micro_batch_num"] < pp:
        out.append(("parallel.micro_batch_num", f"micro_batch_num {par['micro_batch_num']} is below "
                                                f"pipeline_stage {pp}; use at least {pp} to keep every stage busy"))
    if m.data["export"]["seq_length"] > cfg.max_position_embeddings:
        out.append(("export.seq_length", f"{m.data['export']['seq_length']} exceeds model.max_position_embeddings "
                                         f"{cfg.max_position_embeddings}"))
    if m.data["dataset"]["seq_length"] > cfg.max_position_embeddings:
        out.append(("dataset.seq_length", f"{m.data['dataset']['seq_length']} exceeds "
                                          f"model.max_position_embeddings {cfg.max_position_embeddings}"))
    for i, node in enumerate(hw["nodes"]):
        for key in ("device_ids", "device_ips"):
            if key in node and len(node[key]) != hw["devices_per_node"]:
                out.append((f"hardware.nodes[{i}].{key}", f"lists {len(node[key])} entries, but devices_per_node "
                                                          f"is {hw['devices_per_node']}"))
    ips = [n["ip"] for n in hw["nodes"]]
    if len(set(ips)) != len(ips) and hw["device"] == "ascend":
        out.append(("hardware.nodes", "two nodes share an ip; every Ascend node needs its own address"))
    tok = m.data.get("tokenizer", {})
    if tok.get("kind") == "trained" and tok.get("vocab_size", 0) > cfg.vocab_size:
        out.append(("tokenizer.vocab_size", f"{tok['vocab_size']} exceeds model.vocab_size {cfg.vocab_size}: the "
                                            "embedding needs a row for every token"))
    if tok.get("kind") == "qwen" and cfg.vocab_size < QWEN_VOCAB_SIZE:
        out.append(("tokenizer.kind", f"the Qwen tokenizer has {QWEN_VOCAB_SIZE} tokens but model.vocab_size is "
                                      f"{cfg.vocab_size}; use kind = \"trained\" or a larger vocabulary"))
    return out


def memory_warnings(m) -> list[str]:
    return [f"pipeline stage {r['stage']}: estimated {r['total'] / GIB:.1f} GiB per device exceeds "
            f"hardware.device_memory_gb {r['device'] / GIB:g}" for r in memory_estimate(m) if r["total"] > r["device"]]
