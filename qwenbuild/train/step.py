"""One training step as a single GRAPH-mode cell: shifted causal-LM loss, gradient all-reduce, clipping, AdamW."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

IGNORE_INDEX = -100


class CausalLMLoss(nn.Cell):
    """Mean cross entropy of input[:, :-1] predicting target[:, 1:], over positions whose target is not -100."""

    def __init__(self, network: nn.Cell):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, target_ids):
        tokens = input_ids[:, :-1]
        labels = target_ids[:, 1:]
        logits = ops.cast(self.network(tokens), ms.float32)
        mask = ops.cast(labels != IGNORE_INDEX, ms.float32)
        safe_labels = ops.maximum(labels, 0)
        log_probs = ops.log_softmax(logits, axis=-1)
        picked = ops.gather_elements(log_probs, -1, ops.expand_dims(safe_labels, -1)).squeeze(-1)
        return -(picked * mask).sum() / ops.maximum(mask.sum(), 1.0)


def _global_norm(grads):
    return ops.sqrt(ops.addn([ops.square(g).sum() for g in grads]))


class TrainStep(nn.Cell):
    """Forward, backward, mean gradients over data-parallel ranks, clip by global norm, update; returns (loss, norm)."""

    def __init__(self, network: nn.Cell, optimizer: nn.Cell, grad_clip: float, world_size: int):
        super().__init__(auto_prefix=False)
        self.loss = CausalLMLoss(network)
        self.optimizer = optimizer
        self.weights = optimizer.params
        self.grad_fn = ops.value_and_grad(self.loss, None, self.weights)
        self.clip = grad_clip > 0
        self.grad_clip = Tensor(grad_clip, ms.float32)
        self.distributed = world_size > 1
        if self.distributed:
            self.all_reduce = ops.AllReduce()
            self.inv_world = Tensor(1.0 / world_size, ms.float32)
            self.shapes = tuple(w.shape for w in self.weights)
            self.sizes = tuple(int(np.prod(w.shape)) for w in self.weights)

    def construct(self, input_ids, target_ids, lr):
        loss, grads = self.grad_fn(input_ids, target_ids)
        if self.distributed:
            loss, grads = self.mean_over_ranks(loss, grads)
        norm = _global_norm(grads)
        if self.clip:
            scale = ops.minimum(self.grad_clip / (norm + 1e-6), 1.0)
            grads = tuple(g * scale for g in grads)
        loss = ops.depend(loss, self.optimizer(grads, lr))
        return loss, norm

    def mean_over_ranks(self, loss, grads):
        # one all-reduce of a flat vector: per-tensor all-reduces cost a loopback round trip each on CPU
        flat = ops.concat([ops.reshape(loss, (1,))] + [ops.reshape(g, (-1,)) for g in grads])
        flat = self.all_reduce(flat) * self.inv_world
        parts = ops.split(flat[1:], self.sizes)
        return flat[0], tuple(ops.reshape(p, shape) for p, shape in zip(parts, self.shapes))
