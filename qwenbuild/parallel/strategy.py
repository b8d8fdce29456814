"""Strategy files for the Qwen1.5 network, synthesised per rank the way MindFormers shards LlamaForCausalLM.

MindSpore cannot compile a strategy on CPU, so the layouts are written from the network's structure: a JSON file per
rank at <dir>/ckpt_strategy_rank_N.json, readable by mindspore.build_searched_strategy and mergeable across pipeline
stages with mindspore.merge_pipeline_strategys. Files compiled on Ascend (`only_save_strategy`) replace them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwenbuild.dtypes import ITEMSIZE
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import parameter_shapes, split_layer_name
from qwenbuild.store import atomic_path

MAX_RANKS = 1 << 16  # one strategy file per rank: a bound that stops a typo from writing files forever
_STRATEGY_FILE_RE = re.compile(r"_rank_(\d+)(?:_rank_\d+)?\.(json|ckpt)$")
# layer parameters split by model_parallel on the output (row) dimension / on the input (column) dimension
_SPLIT_OUT = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.")
_SPLIT_IN = ("attention.wo.", "feed_forward.w2.")


def stage_layers(num_layers: int, pipeline_stage: int, offset: int | list[int] = 0) -> list[range]:
    """Layers of each pipeline stage by MindFormers' LayerSetting rule.

    Every stage gets num_layers // pipeline_stage layers plus its entry of `offset`; the offsets must add up to the
    remainder, so an uneven split is spelled out by the user, as MindFormers requires.
    """
    if pipeline_stage < 1 or pipeline_stage > num_layers:
        raise UserError(f"pipeline_stage {pipeline_stage} must be between 1 and num_layers {num_layers}")
    if pipeline_stage == 1:
        return [range(num_layers)]
    base, remainder = divmod(num_layers, pipeline_stage)
    offsets = [0] * pipeline_stage if isinstance(offset, int) and offset == 0 else offset
    if isinstance(offsets, int) or len(offsets) != pipeline_stage or sum(offsets) != remainder:
        example = [0] * (pipeline_stage - remainder) + [1] * remainder
        raise UserError(f"{num_layers} layers over {pipeline_stage} pipeline stages: offset {offset!r} must be a "
                        f"list of {pipeline_stage} per-stage extra layers adding up to {remainder}",
                        hint=f"for example offset = {example}")
    counts = [base + o for o in offsets]
    if counts[0] < 0 or counts[-1] < 0 or any(c < 1 for c in counts[1:-1]):
        raise UserError(f"offset {offsets} leaves a pipeline stage with too few layers ({counts})")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def indivisible_dims(cfg: QwenConfig, model_parallel: int, vocab_emb_dp: bool = False) -> list[tuple[str, int]]:
    """Model dimensions that model_parallel must divide but does not."""
    dims = [("num_heads", cfg.num_heads), ("n_kv_heads", cfg.n_kv_heads), ("intermediate_size", cfg.intermediate_size)]
    if not vocab_emb_dp:
        dims.append(("vocab_size", cfg.vocab_size))
    return [(name, value) for name, value in dims if value % model_parallel]


def check_plan(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
               vocab_emb_dp: bool = False) -> None:
    for name, value in (("data_parallel", data_parallel), ("model_parallel", model_parallel),
                        ("pipeline_stage", pipeline_stage)):
        if int(value) < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    ranks = data_parallel * model_parallel * pipeline_stage
    if ranks > MAX_RANKS:
        raise UserError(f"data_parallel {data_parallel} x model_parallel {model_parallel} x pipeline_stage "
                        f"{pipeline_stage} = {ranks:,} ranks, more than the {MAX_RANKS:,} one plan may have")
    for name, value in indivisible_dims(cfg, model_parallel, vocab_emb_dp)[:1]:
        hint = "set vocab_emb_dp = true or change model_parallel" if name == "vocab_size" else \
            "choose a model_parallel that divides it"
        raise UserError(f"model_parallel {model_parallel} does not divide {name} {value}", hint=hint)


def split_dim(name: str, vocab_emb_dp: bool) -> int | None:
    """Dimension of a parameter split by model_parallel, or None when every rank holds it whole."""
    if name in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
        return None if vocab_emb_dp else 0
    layer = split_layer_name(name)
    rest = layer[1] if layer else ""
    if rest.startswith(_SPLIT_OUT):
        return 0
    if rest.startswith(_SPLIT_IN):
        return 1
    return None


def layout(shape: tuple[int, ...], dim: int | None, data_parallel: int, model_parallel: int) -> dict:
    # device matrix [dp, mp]: tensor_map counts axes from the right, so 0 is mp; weights are copies across dp
    tensor_map = [0 if d == dim and model_parallel > 1 else -1 for d in range(len(shape))]
    return {"dev_matrix": [data_parallel, model_parallel], "tensor_map": tensor_map, "param_split_shape": [],
            "indices_offset": [], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}


def shard_shape(shape, dev_matrix, tensor_map) -> list[int]:
    """Shape of one rank's slice under a layout (tensor_map indexes dev_matrix from the right, -1 = whole)."""
    return [s if t == -1 else s // dev_matrix[len(dev_matrix) - 1 - t] for s, t in zip(shape, tensor_map)]


def parameter_stages(cfg: QwenConfig, stages: list[range]) -> dict[str, list[int]]:
    """Pipeline stages holding each parameter: embedding first, norm_out and lm_head last, layers by stage_layers."""
    last = len(stages) - 1
    layer_stage = {i: s for s, r in enumerate(stages) for i in r}
    out = {}
    for name in parameter_shapes(cfg):
        layer = split_layer_name(name)
        if layer:
            out[name] = [layer_stage[layer[0]]]
        elif name == "model.tok_embeddings.embedding_weight":
            # a tied lm_head reads the embedding table on the last stage too
            out[name] = sorted({0, last}) if cfg.tie_word_embeddings else [0]
        else:
            out[name] = [last]
    return out


def _op_strategy(name: str, dim: int | None, dp: int, mp: int, vocab_emb_dp: bool) -> tuple[str, list]:
    cell = name.rsplit(".", 1)[0]
    if name == "model.tok_embeddings.embedding_weight":
        return f"{cell}/Gather", [[1 if vocab_emb_dp else mp, 1], [dp, 1]]
    if dim == 0:
        if name.endswith(".bias"):
            return f"{cell}/BiasAdd", [[dp, mp], [mp]]
        return f"{cell}/MatMul", [[dp, 1], [mp, 1]]
    if dim == 1:
        return f"{cell}/MatMul", [[dp, mp], [1, mp]]
    if name == "lm_head.weight":
        return f"{cell}/MatMul", [[dp, 1], [1, 1]]
    return f"{cell}/Mul", [[dp, 1, 1], [1]]


def stage_strategy(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int, stage: int,
                   vocab_emb_dp: bool = False, offset: int | list[int] = 0) -> dict:
    """The strategy-file content every rank of one pipeline stage shares."""
    stages = stage_layers(cfg.num_layers, pipeline_stage, offset)
    where = parameter_stages(cfg, stages)
    ops, layouts = {}, {}
    for name, shape in parameter_shapes(cfg).items():
        if stage not in where[name]:
            continue
        dim = split_dim(name, vocab_emb_dp)
        op, strategy = _op_strategy(name, dim, data_parallel, model_parallel, vocab_emb_dp)
        ops[op] = {"stage": stage, "parallel_strategy": strategy}
        layouts[name] = layout(shape, dim, data_parallel, model_parallel)
    return {"current_stage": stage, "parallel_strategy_item": ops, "parallel_layout_item": layouts}


def strategy_file_name(rank: int) -> str:
    return f"ckpt_strategy_rank_{rank}.json"


def write_strategy_files(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
                         output_dir: str | Path, vocab_emb_dp: bool = False, offset: int | list[int] = 0) -> list[Path]:
    """One ckpt_strategy_rank_N.json per rank; the directory is replaced as a whole, atomically."""
    check_plan(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp)
    per_stage = data_parallel * model_parallel
    texts = [json.dumps(stage_strategy(cfg, data_parallel, model_parallel, pipeline_stage, s, vocab_emb_dp, offset),
                        indent=1) + "\n" for s in range(pipeline_stage)]
    output_dir = Path(output_dir)
    with atomic_path(output_dir, directory=True) as tmp:
        for rank in range(per_stage * pipeline_stage):
            (tmp / strategy_file_name(rank)).write_text(texts[rank // per_stage], encoding="utf-8")
    return [output_dir / strategy_file_name(r) for r in range(per_stage * pipeline_stage)]


def collect_strategy_files(directory: str | Path, world_size: int | None = None) -> list[Path]:
    """Check a directory of strategy files compiled on Ascend (one per rank) and return them in rank order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"strategy directory {directory} does not exist",
                        hint="point at output/strategy of an only_save_strategy run")
    by_rank: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        m = _STRATEGY_FILE_RE.search(path.name)
        if not m or not path.is_file():
            continue
        if int(m.group(1)) in by_rank:
            raise UserError(f"{directory} holds two strategy files for rank {m.group(1)}: "
                            f"{by_rank[int(m.group(1))].name} and {path.name}")
        by_rank[int(m.group(1))] = path
    if not by_rank:
        raise UserError(f"{directory} holds no strategy file named *_rank_N.ckpt or *_rank_N.json")
    if len({p.suffix for p in by_rank.values()}) > 1:
        raise UserError(f"{directory} mixes .ckpt and .json strategy files", hint="keep one format")
    expected = world_size if world_size is not None else max(by_rank) + 1
    missing = [r for r in range(expected) if r not in by_rank]
    if missing or len(by_rank) != expected:
        raise UserError(f"{directory} has strategy files for ranks {sorted(by_rank)}, the plan has {expected} ranks "
                        f"(missing {missing[:8]})", hint="collect every rank's file from every node")
    import mindspore as ms

    for rank, path in by_rank.items():
        try:
            if not ms.build_searched_strategy(str(path)):
                raise ValueError("no parameter layouts")
        except Exception as exc:  # MindSpore raises several kinds for a bad file
            raise UserError(f"strategy file {path} cannot be read by MindSpore: {exc}")
    return [by_rank[r] for r in range(expected)]


def strategy_stage(path: str | Path) -> int:
    """Pipeline stage recorded in a JSON strategy file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    items = data.get("parallel_strategy_item") or {}
    return int(next(iter(items.values()))["stage"]) if items else int(data.get("current_stage", 0))


def group_name(name: str) -> str:
    layer = split_layer_name(name)
    return f"layers.{layer[1]}" if layer else name


def rank_plan(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
              vocab_emb_dp: bool = False, offset: int | list[int] = 0,
              node_devices: list[list[int]] | None = None, dtype: str | None = None) -> list[dict]:
    """Per rank: node, device, stage, layers and, per parameter group, the shard shape and bytes.

    node_devices lists the physical device ids of each node in rank order (default: one node with every rank).
    """
    check_plan(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp)
    world = data_parallel * model_parallel * pipeline_stage
    node_devices = node_devices or [list(range(world))]
    slots = [(n, d) for n, ids in enumerate(node_devices) for d in ids]
    if len(slots) != world:
        raise UserError(f"the nodes hold {len(slots)} devices but dp x mp x pp = {world}")
    itemsize = ITEMSIZE[dtype or cfg.param_dtype]
    stages = stage_layers(cfg.num_layers, pipeline_stage, offset)
    where = parameter_stages(cfg, stages)
    shapes = parameter_shapes(cfg)
    per_stage_groups = []
    for s in range(pipeline_stage):
        groups: dict[str, dict] = {}
        for name, shape in shapes.items():
            if s not in where[name]:
                continue
            lay = layout(shape, split_dim(name, vocab_emb_dp), data_parallel, model_parallel)
            part = shard_shape(shape, lay["dev_matrix"], lay["tensor_map"])
            g = groups.setdefault(group_name(name), {"count": 0, "full_shape": list(shape), "shard_shape": part,
                                                     "bytes": 0})
            g["count"] += 1
            n = itemsize
            for d in part:
                n *= d
            g["bytes"] += n
        per_stage_groups.append(groups)
    plan = []
    for rank, (node, device) in enumerate(slots):
        s = rank // (data_parallel * model_parallel)
        groups = per_stage_groups[s]
        layers = stages[s]
        plan.append({"rank": rank, "node": node, "device": device, "stage": s,
                     "layers": [layers.start, layers.stop - 1] if len(layers) else [],
                     "model_parallel_index": rank % model_parallel,
                     "groups": groups, "bytes": sum(g["bytes"] for g in groups.values())})
    return plan


def default_offset(num_layers: int, pipeline_stage: int) -> list[int] | int:
    """Offset that puts the remainder layers on the last stages; write the same list into MindFormers' YAML."""
    remainder = num_layers % pipeline_stage
    return 0 if remainder == 0 else [0] * (pipeline_stage - remainder) + [1] * remainder


def shard_table(cfg: QwenConfig, parallel: dict, device_count: int | None = None, dtype: str | None = None) -> str:
    """Text for `qwenbuild plan`: per pipeline stage (its ranks hold the same shapes), each group's shard and bytes."""
    dp, mp, pp = parallel["data_parallel"], parallel["model_parallel"], parallel["pipeline_stage"]
    offset = parallel.get("offset", default_offset(cfg.num_layers, pp))
    plan = rank_plan(cfg, dp, mp, pp, bool(parallel.get("vocab_emb_dp", False)), offset, dtype=dtype)
    if device_count is not None and device_count != len(plan):
        raise UserError(f"the plan has {len(plan)} ranks but the hardware {device_count} devices")
    lines = ["shards per rank     group                                 count  shard shape        MiB/rank"]
    per_stage = dp * mp
    for s in range(pp):
        first = plan[s * per_stage]
        ranks = f"ranks {s * per_stage}-{(s + 1) * per_stage - 1}" if per_stage > 1 else f"rank {s}"
        head = f"stage {s} {ranks}"
        for name, g in first["groups"].items():
            shape = "x".join(map(str, g["shard_shape"]))
            lines.append(f"{head:19s} {name:37s} {g['count']:5d}  {shape:17s} {g['bytes'] / 2**20:9.1f}")
            head = ""
        lines.append(f"{'':19s} {'total, layers ' + '-'.join(map(str, first['layers'])):37s} {'':5s}  {'':17s} "
                     f"{first['bytes'] / 2**20:9.1f}")
    return "\n".join(lines)
