"""Reshard MindSpore checkpoints between strategies (transform_ckpt.py semantics), one destination rank at a time.

MindSpore's transform_checkpoint_by_rank loads every source file whole for every rank; here each tensor is read on
its own (weights.mindspore_ckpt) and passed through the same MindSpore layout transform, so memory holds one rank's
shard plus one source tensor, and the bytes written are those MindSpore would write (with its CRC trailer).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from qwenbuild.dtypes import MINDSPORE
from qwenbuild.errors import UserError
from qwenbuild.parallel.shard_check import check_destination, check_distinct_slices, check_stored_config, full_shapes
from qwenbuild.store import atomic_path, refuse_not_a_directory, write_seal
from qwenbuild.weights.mindspore_ckpt import NUMPY_TYPES, CkptTensor, read_array, read_tensors, read_text

logger = logging.getLogger(__name__)

_EMPTY = ("", "none", "null")


def resolve_strategy(arg: str | Path | None, workdir: Path, label: str) -> str | None:
    """None for complete weights; a strategy file as is; a directory merged across pipeline stages into workdir."""
    if arg is None or str(arg).strip().lower() in _EMPTY:
        return None
    path = Path(arg)
    if path.is_file():
        if path.suffix not in (".json", ".ckpt"):
            raise UserError(f"{label} strategy {path} must be a .json or .ckpt strategy file")
        return str(path)
    if not path.is_dir():
        raise UserError(f"{label} strategy {path} does not exist",
                        hint="pass a strategy file, a directory of per-rank strategy files, or '' for complete weights")
    # a directory qwenbuild wrote carries its seal (.qwenbuild-seal.json): hidden files are no strategies
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".ckpt")
             and not p.name.startswith(("merged", "."))]
    if not files:
        raise UserError(f"{label} strategy directory {path} holds no .json or .ckpt strategy file")
    if len({p.suffix for p in files}) > 1:
        raise UserError(f"{label} strategy directory {path} mixes .json and .ckpt files", hint="keep one format")
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    stage_dir = workdir / f"{label}_strategies"
    stage_dir.mkdir()
    for p in files:
        shutil.copyfile(p, stage_dir / p.name)
    merged = workdir / f"{label}_merged_strategy{files[0].suffix}"
    try:
        ms.merge_pipeline_strategys(str(stage_dir), str(merged))
    except Exception as exc:  # MindSpore raises ValueError/KeyError/DecodeError for unreadable files
        raise UserError(f"{label} strategy directory {path} cannot be merged by MindSpore: {exc}")
    return str(merged)


def strategy_world_size(strategy: str | None) -> tuple[int, int]:
    """(devices per pipeline stage, number of stages) of a strategy file; (1, 1) for complete weights."""
    if strategy is None:
        return 1, 1
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    try:
        layouts = ms.build_searched_strategy(strategy)
    except Exception as exc:
        raise UserError(f"strategy {strategy} cannot be read by MindSpore: {exc}")
    if not layouts:
        raise UserError(f"strategy {strategy} has no parameter layouts")
    first = next(iter(layouts.values()))
    per_stage = 1
    for d in first.dev_matrix[0].dim:
        per_stage *= d
    stages = {int(k.split("-", 1)[0]) if "-" in k else 0 for k in layouts}
    return per_stage, max(stages) + 1


def source_checkpoints(src: str | Path) -> dict[int, Path]:
    """{rank: .ckpt} from a single complete file, a directory of rank_N/<one>.ckpt, or a directory with one .ckpt."""
    src = Path(src)
    if src.is_file():
        return {0: src}
    if not src.is_dir():
        raise UserError(f"source checkpoint {src} does not exist")
    ranks = {}
    for d in src.iterdir():
        if d.is_dir() and d.name.startswith("rank_") and d.name[5:].isdigit():
            ckpts = sorted(d.glob("*.ckpt"))
            if len(ckpts) != 1:
                raise UserError(f"{d} holds {len(ckpts)} .ckpt files ({', '.join(p.name for p in ckpts) or 'none'})",
                                hint="keep exactly one checkpoint per rank directory")
            ranks[int(d.name[5:])] = ckpts[0]
    if ranks:
        return dict(sorted(ranks.items()))
    ckpts = sorted(src.glob("*.ckpt"))
    if len(ckpts) == 1:
        return {0: ckpts[0]}
    raise UserError(f"{src} holds no rank_N/ directories and {len(ckpts)} .ckpt files",
                    hint="lay shards out as DIR/rank_N/<name>.ckpt, or pass a single complete .ckpt file")


def _check_sources(sources: dict[int, Path], src_strategy: str | None, src_ckpt_dir) -> None:
    per_stage, stages = strategy_world_size(src_strategy)
    world = per_stage * stages
    if src_strategy is None and len(sources) > 1:
        raise UserError(f"{src_ckpt_dir} holds {len(sources)} rank checkpoints but no source strategy was given",
                        hint="pass --src_ckpt_strategy with the strategy the shards were made with")
    missing = [r for r in range(world) if r not in sources]
    if missing:
        raise UserError(f"{src_ckpt_dir} lacks rank_{missing[0]} (the source strategy has {world} ranks, "
                        f"found ranks {sorted(sources)})")


# optimizer state with the shape of a parameter, named <prefix><parameter>: sliced as the parameter is
MOMENT_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")


def with_moments(layout_map: dict | None, names) -> dict | None:
    """A layout map in which each optimizer moment present in `names` has its parameter's layout (strategy files
    synthesised here list parameters only; MindSpore's compiled ones list the moments too)."""
    if layout_map is None:
        return None
    out = dict(layout_map)
    for name in names:
        prefix = next((p for p in MOMENT_PREFIXES if name.startswith(p)), None)
        if prefix and name not in out and name[len(prefix):] in layout_map:
            out[name] = layout_map[name[len(prefix):]]
    return out


class _RankWriter:
    """The per-tensor form of mindspore.transform_checkpoint_by_rank for one destination rank."""

    def __init__(self, src_strategy, dst_strategy, indexes: dict[int, dict[str, CkptTensor]], keep=None):
        # mindspore takes seconds to load: imported only when this runs
        import mindspore as ms
        from mindspore.parallel import _parallel_serialization as ps

        self.ms, self.ps = ms, ps
        self.src, self.dst, self.indexes = src_strategy, dst_strategy, indexes
        self.src_per_stage = strategy_world_size(src_strategy)[0]
        self.dst_per_stage = strategy_world_size(dst_strategy)[0]
        self.keep = keep or (lambda _name: True)
        self.names = {n for index in indexes.values() for n in index}
        self.origin_src = with_moments(ps._extract_layout_map(src_strategy), self.names)
        self.origin_dst = with_moments(ps._extract_layout_map(dst_strategy), self.names)

    def params(self, rank: int) -> tuple[list[dict], dict[str, str]]:
        """The rank's tensors, and its string entries (a stored config), which every rank keeps as they are."""
        ms, ps = self.ms, self.ps
        needed = ms.rank_list_for_transform(rank, self.src, self.dst)
        src_map, dst_map = (with_moments(m, self.names) for m in ps._extract_src_dst_layout_map(rank, self.src,
                                                                                                 self.dst))
        names = list(dict.fromkeys(n for r in needed for n in self.indexes[r] if self.keep(n)))
        out, texts = [], {}
        for name in names:
            holder = next(self.indexes[r][name] for r in needed if name in self.indexes[r])
            if holder.type_name == "str":
                texts[name] = read_text(holder)
                continue
            if ps._parameter_not_in_local_stage(name, self.origin_src, src_map) and \
                    ps._parameter_not_in_local_stage(name, self.origin_dst, dst_map):
                continue
            out.append(self._param(rank, name, needed, src_map, dst_map))
        return out, texts

    def _param(self, rank, name, needed, src_map, dst_map) -> dict:
        ms, ps = self.ms, self.ps
        data, types = {}, {}
        for r in needed:
            index = self.indexes[r]
            if name in index:
                data[r % self.src_per_stage] = read_array(index[name])
                types[r % self.src_per_stage] = index[name].type_name
        attrs = {k: (True, False) for k in data}  # what load_checkpoint gives every tensor
        in_layouts = (src_map is None or name in src_map) and (dst_map is None or name in dst_map)
        if in_layouts:
            [param] = ps._transform_parallel_checkpoint(rank % self.dst_per_stage, {name: data}, {name: attrs},
                                                        src_map, dst_map, {name: types})
            return param
        # tensors outside the layouts (step counters, loss scale) are copied from the matching source rank
        key = rank % self.src_per_stage
        p = ms.Parameter(ms.Tensor(data[key]), name, True, False)
        if types[key] == MINDSPORE["bfloat16"]:
            p.set_dtype(ms.bfloat16)
        return {"name": name, "data": p}


def tensor_index(path: Path) -> dict[str, CkptTensor]:
    """Tensors of one source checkpoint by name; refused when empty or holding a type resharding cannot read."""
    tensors = {t.name: t for t in read_tensors(path)}
    if not tensors:
        raise UserError(f"{path} holds no tensors", hint="pass a checkpoint written by mindspore.save_checkpoint")
    for t in tensors.values():
        if t.type_name not in NUMPY_TYPES and t.type_name != "str":
            raise UserError(f"{path}: tensor {t.name!r} has type {t.type_name!r}, which resharding does not handle")
    return tensors


def _stale_ranks(dst: Path, world: int) -> list[str]:
    if not dst.is_dir():
        return []
    return sorted(d.name for d in dst.iterdir()
                  if d.is_dir() and d.name.startswith("rank_") and d.name[5:].isdigit() and int(d.name[5:]) >= world)


def transform_ckpt(src_ckpt_strategy, dst_ckpt_strategy, src_ckpt_dir, dst_ckpt_dir, prefix: str = "checkpoint_",
                   progress: Callable[[str], None] | None = logger.info, keep: Callable[[str], bool] | None = None,
                   seal: bool = True) -> dict:
    """Write dst_ckpt_dir/rank_N/<prefix>N.ckpt for every rank of the destination strategy.

    Strategies: '' or None = complete weights, a file, or a directory of per-rank files (merged across stages).
    Optimizer moments (adam_m.<name>, ...) are sliced as their parameter; `keep(name)` selects the entries written.
    seal=False leaves dst_ckpt_dir unsealed, for a caller whose own directory holds it (and seals that).
    Each rank directory is promoted atomically when complete; nothing else in dst_ckpt_dir is touched.
    """
    progress = progress or (lambda _msg: None)
    started = time.perf_counter()
    dst = Path(dst_ckpt_dir)
    if "/" in prefix or "\0" in prefix or prefix.startswith("."):
        raise UserError(f"--prefix {prefix!r} must be the start of a file name (no '/', not starting with '.')",
                        hint="the shards are written as DST/rank_N/<prefix>N.ckpt, inside --dst_ckpt_dir")
    refuse_not_a_directory(dst, "--dst_ckpt_dir")
    with tempfile.TemporaryDirectory(prefix="qwenbuild-reshard-") as work:
        src_strategy = resolve_strategy(src_ckpt_strategy, Path(work), "source")
        dst_strategy = resolve_strategy(dst_ckpt_strategy, Path(work), "destination")
        sources = source_checkpoints(src_ckpt_dir)
        if any(dst.resolve() in p.resolve().parents for p in sources.values()):
            raise UserError(f"destination {dst} holds the source checkpoints", hint="write to another directory")
        _check_sources(sources, src_strategy, src_ckpt_dir)
        if src_strategy is None and dst_strategy is None:
            raise UserError("both strategies are '' (complete weights): there is nothing to reshard",
                            hint="pass --dst_ckpt_strategy to shard, or --src_ckpt_strategy to merge shards")
        per_stage, stages = strategy_world_size(dst_strategy)
        world = per_stage * stages
        stale = _stale_ranks(dst, world)
        if stale:
            raise UserError(f"{dst} already holds {', '.join(stale[:4])} from a layout with more ranks than this "
                            f"one ({world})", hint="write this layout to a new directory; nothing was changed")
        writer = _RankWriter(src_strategy, dst_strategy, {r: tensor_index(p) for r, p in sources.items()}, keep)
        # the strategies hold layouts, not shapes: every shard is checked against them before a byte is written
        full = full_shapes(writer.indexes, writer.origin_src, writer.src_per_stage)
        check_stored_config(writer.indexes, full)
        check_destination(full, writer.origin_dst)
        check_distinct_slices(writer.indexes, writer.origin_src, writer.src_per_stage)
        inputs = [src_ckpt_dir, src_ckpt_strategy or None, dst_ckpt_strategy or None]
        files, total = [], 0
        for rank in range(world):
            t0 = time.perf_counter()
            params, texts = writer.params(rank)
            final = dst / f"rank_{rank}"
            with atomic_path(final, directory=True, inputs=inputs) as tmp:
                writer.ms.save_checkpoint(params, str(tmp / f"{prefix}{rank}.ckpt"), append_dict=texts or None,
                                          crc_check=True)
            del params
            path = final / f"{prefix}{rank}.ckpt"
            size = path.stat().st_size
            files.append(path)
            total += size
            progress(f"transform_ckpt: rank {rank + 1}/{world}: {path} {size / 2**20:.1f} MiB "
                     f"in {time.perf_counter() - t0:.2f} s")
    # the seal claims the rank directories written here, never what else the destination holds
    digest = write_seal(dst, within=[f"rank_{r}" for r in range(world)]) if seal else None
    seconds = time.perf_counter() - started
    progress(f"transform_ckpt: {world} ranks, {total / 2**20:.1f} MiB written to {dst} in {seconds:.1f} s")
    return {"ranks": world, "files": files, "bytes": total, "seconds": seconds, "digest": digest}
