"""Strategy files for the Qwen1.5 network, synthesised per rank the way MindFormers shards LlamaForCausalLM.

MindSpore cannot compile a strategy on CPU, so the layouts are written from the network's structure: a JSON file per
rank at <dir>/ckpt_strategy_rank_N.json, readable by mindspore.build_searched_strategy and mergeable across pipeline
stages with mindspore.merge_pipeline_strategys. Files compiled on Ascend (`only_save_strategy`) replace them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwenbuild.digests import file_digest, json_digest
from qwenbuild.errors import UserError
from qwenbuild.model import lora
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import EMBEDDING, parameter_shapes, split_layer_name
from qwenbuild.parallel.plan_rules import check_plan, stage_layers
from qwenbuild.store import atomic_path

_STRATEGY_FILE_RE = re.compile(r"_rank_(\d+)(?:_rank_\d+)?\.(json|ckpt)$")
# layer parameters split by model_parallel on the output (row) dimension / on the input (column) dimension
_SPLIT_OUT = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.")
_SPLIT_IN = ("attention.wo.", "feed_forward.w2.")


def split_dim(name: str, vocab_emb_dp: bool) -> int | None:
    """Dimension of a parameter split by model_parallel, or None when every rank holds it whole."""
    if name in (EMBEDDING, "lm_head.weight"):
        return None if vocab_emb_dp else 0
    layer = split_layer_name(name)
    rest = layer[1] if layer else ""
    if rest.startswith(_SPLIT_OUT):
        return 0
    if rest.startswith(_SPLIT_IN):
        return 1
    return None


def tensor_layout(shape: tuple[int, ...], dim: int | None, data_parallel: int, model_parallel: int) -> dict:
    # device matrix [dp, mp]: tensor_map counts axes from the right, so 0 is mp; weights are copies across dp
    tensor_map = [0 if d == dim and model_parallel > 1 else -1 for d in range(len(shape))]
    return {"dev_matrix": [data_parallel, model_parallel], "tensor_map": tensor_map, "param_split_shape": [],
            "indices_offset": [], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}


def shard_shape(shape, dev_matrix, tensor_map) -> list[int]:
    """Shape of one rank's slice under a layout (tensor_map indexes dev_matrix from the right, -1 = whole)."""
    return [s if t == -1 else s // dev_matrix[len(dev_matrix) - 1 - t] for s, t in zip(shape, tensor_map)]


def top_parameter_stages(name: str, last: int, tied: bool) -> list[int]:
    """Pipeline stages holding a parameter outside the layers: embedding first, norm_out and lm_head last."""
    if name == EMBEDDING:
        # a tied lm_head reads the embedding table on the last stage too
        return sorted({0, last}) if tied else [0]
    return [last]


def parameter_stages(cfg: QwenConfig, stages: list[range]) -> dict[str, list[int]]:
    """Pipeline stages holding each parameter: embedding first, norm_out and lm_head last, layers by stage_layers."""
    last = len(stages) - 1
    layer_stage = {i: s for s, r in enumerate(stages) for i in r}
    out = {}
    for name in parameter_shapes(cfg):
        layer = split_layer_name(name)
        out[name] = [layer_stage[layer[0]]] if layer else top_parameter_stages(name, last, cfg.tie_word_embeddings)
    return out


def _op_strategy(name: str, dim: int | None, dp: int, mp: int, vocab_emb_dp: bool) -> tuple[str, list]:
    cell = name.rsplit(".", 1)[0]
    if name == EMBEDDING:
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


def _adapter_strategies(weight: str, dim: int | None, dp: int, mp: int) -> dict[str, list]:
    """The MatMuls of a LoRA target's adapters, sharded as MindFormers shards LoRADense's from its weight's MatMul:
    A whole beside a column-parallel weight, split on its input beside a row-parallel one; B the other way."""
    cell = lora.cell_of(weight)
    if dim == 1:
        return {f"{cell}/lora_a_matmul/MatMul": [[dp, mp], [1, mp]], f"{cell}/lora_b_matmul/MatMul": [[dp, 1], [1, 1]]}
    return {f"{cell}/lora_a_matmul/MatMul": [[dp, 1], [1, 1]],
            f"{cell}/lora_b_matmul/MatMul": [[dp, 1], [mp if dim == 0 else 1, 1]]}


def stage_strategy(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int, stage: int,
                   vocab_emb_dp: bool = False, offset: int | list[int] = 0, lora_targets=()) -> dict:
    """The strategy-file content every rank of one pipeline stage shares; `lora_targets` (Hugging Face module names)
    add each target's adapters, split as their weight is."""
    stages = stage_layers(cfg.num_layers, pipeline_stage, offset)
    where = parameter_stages(cfg, stages)
    adapted = set(lora.target_cells(cfg, lora_targets))
    ops, layouts = {}, {}
    for name, shape in parameter_shapes(cfg).items():
        if stage not in where[name]:
            continue
        dim = split_dim(name, vocab_emb_dp)
        op, strategy = _op_strategy(name, dim, data_parallel, model_parallel, vocab_emb_dp)
        ops[op] = {"stage": stage, "parallel_strategy": strategy}
        layouts[name] = tensor_layout(shape, dim, data_parallel, model_parallel)
        if lora.cell_of(name) in adapted and name.endswith(".weight"):
            for op, strategy in _adapter_strategies(name, dim, data_parallel, model_parallel).items():
                ops[op] = {"stage": stage, "parallel_strategy": strategy}
            for part in (lora.A, lora.B):
                adapter = f"{lora.cell_of(name)}.{part}"
                # a layout depends on the number of dimensions only: without the rank, a rank edit leaves the
                # strategy files (and so the shards) as they are
                layouts[adapter] = tensor_layout((None, None), lora.split_dim(adapter, dim), data_parallel,
                                                 model_parallel)
    return {"current_stage": stage, "parallel_strategy_item": ops, "parallel_layout_item": layouts}


def strategy_file_name(rank: int) -> str:
    return f"ckpt_strategy_rank_{rank}.json"


def strategy_files(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
                   vocab_emb_dp: bool = False, offset: int | list[int] = 0, lora_targets=()) -> dict[str, str]:
    """{ckpt_strategy_rank_N.json: text} for every rank; the ranks of one pipeline stage share their text."""
    check_plan(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp, offset)
    per_stage = data_parallel * model_parallel
    texts = [json.dumps(stage_strategy(cfg, data_parallel, model_parallel, pipeline_stage, s, vocab_emb_dp, offset,
                                       lora_targets), indent=1) + "\n" for s in range(pipeline_stage)]
    return {strategy_file_name(rank): texts[rank // per_stage] for rank in range(per_stage * pipeline_stage)}


def write_strategy_files(cfg: QwenConfig, data_parallel: int, model_parallel: int, pipeline_stage: int,
                         output_dir: str | Path, vocab_emb_dp: bool = False, offset: int | list[int] = 0,
                         lora_targets=()) -> list[Path]:
    """One ckpt_strategy_rank_N.json per rank; the directory is replaced as a whole, atomically."""
    files = strategy_files(cfg, data_parallel, model_parallel, pipeline_stage, vocab_emb_dp, offset, lora_targets)
    output_dir = Path(output_dir)
    with atomic_path(output_dir, directory=True) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return [output_dir / name for name in files]


def weight_layouts_digest(directory: str | Path) -> str:
    """Digest of a directory's strategy files without their LoRA adapters' entries: what slicing the weights
    depends on (a compiled .ckpt file counts whole)."""
    files = {}
    for path in sorted(p for p in Path(directory).iterdir() if _STRATEGY_FILE_RE.search(p.name) and p.is_file()):
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            data["parallel_layout_item"] = {k: v for k, v in data.get("parallel_layout_item", {}).items()
                                            if not lora.is_adapter(k)}
            data["parallel_strategy_item"] = {k: v for k, v in data.get("parallel_strategy_item", {}).items()
                                              if "/lora_" not in k}
            files[path.name] = data
        else:
            files[path.name] = file_digest(path)
    return json_digest(files)


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
    # mindspore takes seconds to load: imported only when this runs
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
