"""Source shards checked against the strategies before resharding writes anything.

A strategy file holds layouts, not shapes: MindSpore would cut whatever tensors it is handed. So each source rank
must hold the parameters of its own pipeline stage, each at the source layout's slice of one full shape (the
checkpoint's own config.json gives that shape when the checkpoint carries one); ranks meant to hold different
slices must not hold the same bytes; and the destination layout must split every full shape evenly.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.lora import is_adapter
from qwenbuild.model.params import CONFIG_ENTRY, is_beside_weights, parameter_shapes
from qwenbuild.weights.mindspore_ckpt import CkptTensor, read_text

_HINT = "pass the strategy the shards were cut with, and the checkpoint it describes (each rank_N/ holds rank N's own)"


def splits(layout) -> list[int]:
    """Pieces each dimension is cut into under a layout (MindSpore's own arithmetic, optimizer shards included)."""
    # mindspore takes seconds to load: imported only when this runs
    from mindspore.parallel._tensor import _extract_layout_item, _get_tensor_strategy

    dev_matrix, tensor_map, _, opt_shard_size = _extract_layout_item(layout)
    out = [int(k) for k in _get_tensor_strategy(dev_matrix, tensor_map)]
    if opt_shard_size > 0 and out:
        out[0] *= int(opt_shard_size)
    return out


def _weights(index: dict[str, CkptTensor]) -> dict[str, CkptTensor]:
    return {n: t for n, t in index.items() if t.type_name != "str"}


def full_shapes(indexes: dict[int, dict[str, CkptTensor]], layouts: dict | None,
                per_stage: int) -> dict[str, tuple[int, ...]]:
    """name -> full shape, as every source rank holding it implies; a refusal when a rank holds another stage's
    parameter, lacks one of its own, or implies another full shape than a rank before it."""
    found: dict[str, tuple[tuple[int, ...], CkptTensor]] = {}
    for rank, index in indexes.items():
        stage = rank // per_stage
        for name, t in _weights(index).items():
            layout = layouts.get(name) if layouts else None
            if layout is not None and stage not in layout[6]:
                raise UserError(f"{t.path} (rank {rank}, stage {stage}) holds {name}, which the source strategy puts "
                                f"on stage {', '.join(map(str, layout[6]))}", hint=_HINT)
            pieces = splits(layout) if layout is not None else [1] * len(t.shape)
            if len(pieces) != len(t.shape):
                raise UserError(f"{t.path}: {name} has {len(t.shape)} dimensions {list(t.shape)}, the source strategy "
                                f"lays out {len(pieces)}", hint=_HINT)
            full = tuple(s * k for s, k in zip(t.shape, pieces))
            if name in found and found[name][0] != full:
                other = found[name][1]
                raise UserError(f"{t.path}: {name} is {list(t.shape)}, a slice of {list(full)} by the source strategy, "
                                f"but {other.path} holds {list(other.shape)}, a slice of {list(found[name][0])}",
                                hint=_HINT)
            found[name] = (full, t)
        if layouts:
            kinds = held_kinds(index)
            lacking = [n for n, layout in layouts.items() if stage in layout[6] and n not in index
                       and not is_beside_weights(n) and is_adapter(n) in kinds]
            if lacking:
                where = next(iter(index.values())).path if index else f"rank {rank}"
                raise UserError(f"{where} (rank {rank}, stage {stage}) lacks {', '.join(lacking[:3])}"
                                f"{' ...' if len(lacking) > 3 else ''}, which the source strategy puts on its stage",
                                hint=_HINT)
    return {name: shape for name, (shape, _) in found.items()}


def check_stored_config(indexes: dict[int, dict[str, CkptTensor]], full: dict[str, tuple[int, ...]]) -> None:
    """The full shapes against the config.json qwenbuild stores in its checkpoints, when one is there."""
    stored = next((index[CONFIG_ENTRY] for index in indexes.values() if CONFIG_ENTRY in index), None)
    if stored is None:
        return
    try:
        cfg = QwenConfig.from_hf_dict(json.loads(read_text(stored)))
    except (ValueError, UserError):
        return  # not one of qwenbuild's: the shapes among themselves are all there is to check
    for name, shape in parameter_shapes(cfg).items():
        if name in full and tuple(full[name]) != tuple(shape):
            raise UserError(f"{name} is {list(full[name])} by the shards in {stored.path.parent} and the source "
                            f"strategy, but the checkpoint's own config.json makes it {list(shape)}", hint=_HINT)


def held_kinds(names) -> set[bool]:
    """Which kinds of weight a checkpoint holds, by is_adapter: a kind it holds must be there whole. LoRA adapters
    alone (what a LoRA finetune saves per rank) and base weights alone (the adapters start afresh) are both cut by
    the whole network's strategy, as MindFormers cuts them."""
    return {is_adapter(n) for n in names if not is_beside_weights(n)}


def check_destination(full: dict[str, tuple[int, ...]], layouts: dict | None) -> None:
    """Every weight laid out by the destination strategy, and split by it into equal pieces."""
    if layouts is None:
        return
    for name, shape in full.items():
        if is_beside_weights(name):
            continue
        if name not in layouts:
            raise UserError(f"the destination strategy does not lay out {name} (full shape {list(shape)})",
                            hint="pass a strategy made for this model")
        pieces = splits(layouts[name])
        if len(pieces) != len(shape) or any(s % k for s, k in zip(shape, pieces)):
            raise UserError(f"the destination strategy cuts {name} into {' x '.join(map(str, pieces))} pieces, which "
                            f"its full shape {list(shape)} does not divide", hint="pass a strategy made for this model")
    absent = [n for n in layouts if n not in full and not is_beside_weights(n)]
    kinds = held_kinds(full)
    absent = [n for n in absent if is_adapter(n) in kinds]
    if absent:
        raise UserError(f"the destination strategy lays out {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}"
                        ", which the source checkpoint does not hold", hint="pass a strategy made for this model")


def check_distinct_slices(indexes: dict[int, dict[str, CkptTensor]], layouts: dict | None, per_stage: int) -> None:
    """Ranks meant to hold different slices of a parameter do not hold the same bytes (a rank's file copied into
    another rank's directory); checked on the smallest split matrix, so it costs little."""
    if not layouts:
        return
    from mindspore.parallel._tensor import _get_tensor_slice_index  # mindspore loads slowly

    candidates = [(t.nbytes, name) for name, t in _weights(next(iter(indexes.values()))).items()
                  if name in layouts and len(t.shape) >= 2 and np.prod(splits(layouts[name])) > 1]
    if not candidates:
        return
    name = min(candidates)[1]
    layout = layouts[name]
    seen: dict[str, tuple[int, int]] = {}
    for rank, index in indexes.items():
        if name not in index:
            continue
        where = int(_get_tensor_slice_index(layout[0], splits(layout), layout[1], rank % per_stage))
        digest = hashlib.sha256(b"".join(index[name].chunks())).hexdigest()
        if digest in seen and seen[digest][1] != where:
            raise UserError(f"rank {rank} holds the same {name} as rank {seen[digest][0]}, though the source strategy "
                            f"gives them different slices of it: {index[name].path} is a copy of another rank's shard",
                            hint=_HINT)
        seen.setdefault(digest, (rank, where))
