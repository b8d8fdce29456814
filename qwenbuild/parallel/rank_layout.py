"""What one training process holds, read from the strategy files: which dimension of each parameter model
parallelism splits, its place in the data- and model-parallel groups, and the ranks (one per stage) it stands for.

CPU workers cannot pass activations between pipeline stages (no send/receive on CPU), so a process stands for the
ranks of every stage at its data/model-parallel position and runs their layers in sequence: process p holds ranks
p, p + dp*mp, p + 2*dp*mp, ...; with pipeline_stage = 1 process p is rank p.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.parallel.strategy import strategy_file_name


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    process: int
    processes: int  # data_parallel x model_parallel: the worker processes of one training run
    model_parallel: int
    mp_index: int
    ranks: tuple[int, ...]  # the rank of each pipeline stage this process stands for
    splits: dict  # parameter name -> dimension split by model parallelism, or None when every process holds it whole
    stage_names: tuple[frozenset, ...]  # per stage: the parameters its strategy file lists
    mp_group: tuple[int, ...]  # processes holding the other slices of this process's parameters
    dp_group: tuple[int, ...]  # processes holding the same slices (their gradients are averaged)

    @property
    def data_parallel(self) -> int:
        return self.processes // self.model_parallel

    @property
    def pipeline_stage(self) -> int:
        return len(self.ranks)

    @property
    def dp_index(self) -> int:
        """Which slice of the global batch this process trains on."""
        return self.dp_group.index(self.process)

    def stage_filter(self, stage: int):
        """Which checkpoint entries belong to one stage's rank (its parameters and their moments, and the step
        counters), or None when the process stands for one rank only."""
        if self.pipeline_stage == 1:
            return None
        mine, every = self.stage_names[stage], set().union(*self.stage_names)

        def keep(name: str) -> bool:
            base = name.split(".", 1)[1] if name.startswith(("adam_m.", "adam_v.")) else name
            return base in mine or base not in every

        return keep

    def split(self, name: str) -> int | None:
        return self.splits.get(name)

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dim = self.split(name)
        return tuple(s // self.model_parallel if d == dim else s for d, s in enumerate(shape))


def single_process() -> ProcessLayout:
    """The layout of a run without strategy files: one process holding every parameter whole."""
    return ProcessLayout(0, 1, 1, 0, (0,), {}, (), (0,), (0,))


def _read(path: Path) -> dict:
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    try:
        layouts = ms.build_searched_strategy(str(path))
    except Exception as exc:  # MindSpore raises several kinds for a bad file
        raise UserError(f"strategy file {path} cannot be read by MindSpore: {exc}")
    if not layouts:
        raise UserError(f"strategy file {path} has no parameter layouts")
    return {name: (list(layout.dev_matrix[0].dim), list(layout.tensor_map[0].dim)) for name, layout in layouts.items()}


def _stage_file(strategy_dir: Path, rank: int) -> Path:
    for suffix in (".json", ".ckpt"):
        path = strategy_dir / strategy_file_name(rank).replace(".json", suffix)
        if path.is_file():
            return path
    raise UserError(f"{strategy_dir} has no strategy file for rank {rank}",
                    hint="rebuild the strategy files for this plan (doit strategy)")


def _splits(path: Path, layouts: dict) -> tuple[list[int], int | None, dict]:
    """(device matrix, model-parallel axis, {name: split dim}) of one stage's file."""
    dev_matrix, axis, splits = None, None, {}
    for name, (dev, tensor_map) in layouts.items():
        if dev_matrix is None:
            dev_matrix = dev
        elif dev != dev_matrix:
            raise UserError(f"{path}: {name} has device matrix {dev}, other parameters {dev_matrix}",
                            hint="qwenbuild trains on CPU with one device matrix per stage")
        split = [(d, len(dev) - 1 - t) for d, t in enumerate(tensor_map) if t != -1 and dev[len(dev) - 1 - t] > 1]
        if len(split) > 1 or (split and axis is not None and split[0][1] != axis):
            raise UserError(f"{path}: {name} is split on more than one device axis ({tensor_map} over {dev})",
                            hint="qwenbuild's CPU network splits each parameter on one dimension by model_parallel")
        if split:
            axis = split[0][1]
        splits[name] = split[0][0] if split else None
    return dev_matrix, axis, splits


def process_layout(strategy_dir: str | Path, process: int, processes: int, pipeline_stage: int) -> ProcessLayout:
    """The layout of worker `process` of `processes` (= dp x mp), for ranks process + s x processes."""
    strategy_dir = Path(strategy_dir)
    ranks = tuple(process + s * processes for s in range(pipeline_stage))
    dev_matrix, axis, splits, names = None, None, {}, []
    for rank in ranks:
        path = _stage_file(strategy_dir, rank)
        dev, stage_axis, stage_splits = _splits(path, _read(path))
        if int(np.prod(dev)) != processes:
            raise UserError(f"{path}: its device matrix {dev} holds {int(np.prod(dev))} ranks per stage, the run "
                            f"has {processes} processes (data_parallel x model_parallel)",
                            hint="rebuild the strategy files for this plan (doit strategy)")
        if dev_matrix is not None and (dev != dev_matrix or (stage_axis is not None and axis is not None
                                                            and stage_axis != axis)):
            raise UserError(f"{path}: stage layouts differ from the first stage's ({dev} vs {dev_matrix})")
        dev_matrix = dev
        axis = axis if stage_axis is None else stage_axis
        splits.update(stage_splits)
        names.append(frozenset(stage_splits))
    coords = np.unravel_index(process, dev_matrix)
    mp = dev_matrix[axis] if axis is not None else 1
    mp_index = int(coords[axis]) if axis is not None else 0
    all_coords = [np.unravel_index(p, dev_matrix) for p in range(processes)]
    same = lambda c, keep: all(c[a] == coords[a] for a in range(len(dev_matrix)) if a in keep)  # noqa: E731
    others = [a for a in range(len(dev_matrix)) if a != axis]
    mp_group = tuple(p for p, c in enumerate(all_coords) if same(c, others))
    dp_group = tuple(p for p, c in enumerate(all_coords) if axis is None or c[axis] == coords[axis])
    return ProcessLayout(process, processes, mp, mp_index, ranks, splits, tuple(names), mp_group, dp_group)
