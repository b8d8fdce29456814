"""Megatron-style tensor parallelism with MindSpore's own collectives, as the CPU backend runs them.

Column-parallel linears take their input through `CopyToModelParallel` (identity forward, gradient summed over the
model-parallel group backward); row-parallel linears and the vocabulary-parallel embedding sum their partial
outputs with `ReduceFromModelParallel` (all-reduce forward, identity backward). On CPU, AllReduce sums only and
AllGather works only on the world group, so gathers and maxima are sums of one-hot placed slices.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

F32 = ms.float32


# `layout` below is one process's part of the plan (qwenbuild.parallel.rank_layout.ProcessLayout): its
# processes, model_parallel, mp_index, mp_group, dp_group and split(name)


def group_names(layout) -> tuple[str, str]:
    """Names of this process's model- and data-parallel communication groups."""
    return f"mp_{'_'.join(map(str, layout.mp_group))}", f"dp_{'_'.join(map(str, layout.dp_group))}"


_created: set[str] = set()


def create_groups(layout) -> None:
    """Create the groups with more than one member that are not the world group (under msrun, after init())."""
    # mindspore takes seconds to load: imported only when this runs
    from mindspore.communication import create_group

    for name, members in zip(group_names(layout), (layout.mp_group, layout.dp_group)):
        if 1 < len(members) < layout.processes and name not in _created:
            create_group(name, list(members))
            _created.add(name)


def group_of(layout, members: tuple[int, ...]) -> str:
    """The group to pass to a collective: the world group when the members are every process."""
    if len(members) == layout.processes:
        # mindspore takes seconds to load: imported only when this runs
        from mindspore.communication import GlobalComm

        return GlobalComm.WORLD_COMM_GROUP
    return group_names(layout)[0 if members == layout.mp_group else 1]


class CopyToModelParallel(nn.Cell):
    """Identity forward; backward sums the input's gradient over the model-parallel group."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(group=group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromModelParallel(nn.Cell):
    """Sum over the model-parallel group forward; identity backward (every process holds the same loss)."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(group=group)

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class Identity(nn.Cell):
    def construct(self, x):
        return x


class ModelParallel:
    """One process's part of the model: which parameters are split and the cells that join the slices."""

    def __init__(self, layout=None):
        self.layout = layout
        self.size, self.index = (layout.model_parallel, layout.mp_index) if layout else (1, 0)
        self.group = group_of(layout, layout.mp_group) if self.size > 1 else None

    def split(self, name: str) -> int | None:
        return self.layout.split(name) if self.size > 1 else None

    def copy_in(self) -> nn.Cell:
        return CopyToModelParallel(self.group) if self.size > 1 else Identity()

    def reduce_out(self) -> nn.Cell:
        return ReduceFromModelParallel(self.group) if self.size > 1 else Identity()


class GatherLastDim(nn.Cell):
    """The slices x [..., n] of every model-parallel process joined on the last dimension (forward only)."""

    def __init__(self, parallel: ModelParallel):
        super().__init__()
        self.size, self.index = parallel.size, parallel.index
        self.all_reduce = ops.AllReduce(group=parallel.group)
        self.slot = ms.Tensor([1.0 if i == parallel.index else 0.0 for i in range(parallel.size)], F32)

    def construct(self, x):
        # the CPU AllGather runs on the world group only: place the slice among zeros and sum
        placed = ops.expand_dims(x, 0) * ops.reshape(self.slot, (self.size,) + (1,) * len(x.shape))
        joined = self.all_reduce(placed)
        rank = len(x.shape)
        return ops.reshape(ops.transpose(joined, tuple(range(1, rank)) + (0, rank)),
                           x.shape[:-1] + (self.size * x.shape[-1],))


class VocabParallelCrossEntropy(nn.Cell):
    """Per-token -log softmax(logits)[label] for logits split on the vocabulary: each process holds
    logits [N, V/mp] of vocabulary rows index x V/mp .. (index + 1) x V/mp; labels [N] are global ids."""

    def __init__(self, parallel: ModelParallel, vocab_size: int):
        super().__init__()
        self.size, self.part = parallel.size, vocab_size // parallel.size
        self.start = parallel.index * self.part
        self.gather = GatherLastDim(parallel)
        self.reduce = ReduceFromModelParallel(parallel.group)

    def construct(self, logits, labels):
        # any constant shared by every slice keeps exp() in range; the global max is one (no gradient flows)
        local_max = ops.max(logits, axis=-1, keepdims=True)[0]
        shift = ops.stop_gradient(ops.max(self.gather(local_max), axis=-1, keepdims=True)[0])
        shifted = logits - shift
        total = self.reduce(ops.sum(ops.exp(shifted), -1))
        local = labels - self.start
        mine = ops.logical_and(local >= 0, local < self.part)
        picked = ops.gather_elements(shifted, -1, ops.expand_dims(ops.where(mine, local, 0), -1)).squeeze(-1)
        target = self.reduce(picked * ops.cast(mine, F32))
        return ops.log(total) - target
