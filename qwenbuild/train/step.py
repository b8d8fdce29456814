"""One training step as a single GRAPH-mode cell: shifted causal-LM loss, gradient all-reduce, clipping, AdamW."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from qwenbuild.model.cpu_kernels import F32, squares_summed
from qwenbuild.model.fused_kernels import kernels
from qwenbuild.model.lora import is_adapter, summed_over_model_parallel, weight_of
from qwenbuild.model.tensor_parallel import VocabParallelCrossEntropy, group_of
from qwenbuild.parallel.rank_layout import ProcessLayout, single_process

IGNORE_INDEX = -100
# gradients are squared and summed as rows of this width; those up to ONE_VECTOR_UP_TO elements (below it a kernel's
# launch costs more than a copy) or of a size no multiple of ROW are joined first, zeros padding the end
ROW = 128
ONE_VECTOR_UP_TO = 1 << 16


class CausalLMLoss(nn.Cell):
    """Mean cross entropy of input[:, :-1] predicting target[:, 1:] over positions whose target is not -100 (the
    mean of this process's rows, as MindFormers computes it per data-parallel rank)."""

    def __init__(self, network: nn.Cell):
        super().__init__(auto_prefix=False)
        self.network = network
        self.vocab_parallel = getattr(network, "vocab_parallel", False)
        if self.vocab_parallel:
            self.cross_entropy = VocabParallelCrossEntropy(network.parallel, network.cfg.vocab_size)
        found = None if self.vocab_parallel else kernels()
        # one pass over the logits each way, split over MindSpore's threads, where log_softmax's gradient is one thread
        self.fused_cross_entropy = found.cross_entropy if found else None
        self.threads = Tensor(float(ms.get_context("runtime_num_threads") or 1), ms.float32)

    def construct(self, input_ids, target_ids):
        tokens = input_ids[:, :-1]
        labels = target_ids[:, 1:]
        logits = ops.cast(self.network(tokens), ms.float32)
        mask = ops.cast(labels != IGNORE_INDEX, ms.float32)
        safe_labels = ops.maximum(labels, 0)
        if self.fused_cross_entropy is not None:
            b, s, v = logits.shape
            token_loss, _ = self.fused_cross_entropy(ops.reshape(logits, (-1, v)),
                                                     ops.reshape(ops.cast(safe_labels, ms.int32), (-1,)), self.threads)
            token_loss = ops.reshape(token_loss, (b, s))
        elif self.vocab_parallel:
            b, s, v = logits.shape
            token_loss = ops.reshape(self.cross_entropy(ops.reshape(logits, (-1, v)), ops.reshape(safe_labels, (-1,))),
                                     (b, s))
        else:
            log_probs = ops.log_softmax(logits, axis=-1)
            token_loss = -ops.gather_elements(log_probs, -1, ops.expand_dims(safe_labels, -1)).squeeze(-1)
        return (token_loss * mask).sum() / ops.maximum(mask.sum(), 1.0)


class TrainStep(nn.Cell):
    """Forward, backward, loss and gradients averaged over data-parallel processes, clip by global norm (slices of
    split parameters counted once over the model-parallel group), update; returns (loss, norm)."""

    def __init__(self, network: nn.Cell, optimizer: nn.Cell, grad_clip: float, layout: ProcessLayout | None = None):
        super().__init__(auto_prefix=False)
        layout = layout or single_process()
        self.distributed = layout.data_parallel > 1
        self.loss = CausalLMLoss(network)
        self.optimizer = optimizer
        self.weights = optimizer.params
        self.grad_fn = ops.value_and_grad(self.loss, None, self.weights)
        self.clip = grad_clip > 0
        found = kernels()
        self.fused_squares = found.sum_of_squares if found else None
        self.threads = self.loss.threads
        self.grad_clip = Tensor(grad_clip, ms.float32)
        self.unscaled = Tensor(1.0, ms.float32)
        if self.distributed:
            self.all_reduce = ops.AllReduce(group=group_of(layout, layout.dp_group))
            self.inv_dp = Tensor(1.0 / layout.data_parallel, ms.float32)
            self.shapes = tuple(w.shape for w in self.weights)
            self.sizes = tuple(int(np.prod(w.shape)) for w in self.weights)
        split = tuple(layout.model_parallel > 1 and layout.split(w.name) is not None for w in self.weights)
        self.split_grads = tuple(i for i, s in enumerate(split) if s)
        self.whole_grads = tuple(i for i, s in enumerate(split) if not s)
        self.joined = tuple(n <= ONE_VECTOR_UP_TO or n % ROW > 0 for n in (int(np.prod(w.shape)) for w in self.weights))
        if self.split_grads:
            self.sum_slices = ops.AllReduce(group=group_of(layout, layout.mp_group))
        # a LoRA adapter held whole beside a split weight gets each model-parallel process's share of its gradient
        self.shared_grads = tuple(i for i, w in enumerate(self.weights) if layout.model_parallel > 1
                                  and is_adapter(w.name)
                                  and summed_over_model_parallel(w.name, layout.split(weight_of(w.name))))
        if self.shared_grads:
            self.sum_shares = ops.AllReduce(group=group_of(layout, layout.mp_group))
            self.share_shapes = tuple(self.weights[i].shape for i in self.shared_grads)
            self.share_sizes = tuple(int(np.prod(shape)) for shape in self.share_shapes)
            self.share_slot = tuple(self.shared_grads.index(i) if i in self.shared_grads else -1
                                    for i in range(len(self.weights)))

    def construct(self, input_ids, target_ids, lr):
        loss, grads = self.grad_fn(input_ids, target_ids)
        if self.shared_grads:
            grads = self.sum_over_model_parallel(grads)
        if self.distributed:
            loss, grads = self.mean_over_processes(loss, grads)
        norm = self.global_norm(grads)
        # the optimizer applies the clipping factor as it reads each gradient: no pass of its own over them. Through
        # the norm it waits for every gradient, so no update runs while a kernel still reads the weights
        scale = ops.minimum(self.grad_clip / (norm + 1e-6), 1.0) if self.clip else ops.depend(self.unscaled, norm)
        loss = ops.depend(loss, self.optimizer(grads, lr, scale))
        return loss, norm

    def global_norm(self, grads):
        squares = self.sum_of_squares(grads, self.whole_grads)
        if self.split_grads:
            squares = squares + self.sum_slices(self.sum_of_squares(grads, self.split_grads))
        return ops.sqrt(squares)

    def sum_of_squares(self, grads, indices):
        """The sum of the squares of grads[i] for i in indices: each large gradient as rows on its own, the others
        joined."""
        matrices = [ops.reshape(ops.cast(grads[i], F32), (-1, ROW)) for i in indices if not self.joined[i]]
        joined = [ops.reshape(ops.cast(grads[i], F32), (-1,)) for i in indices if self.joined[i]]
        if joined:
            pad = -sum(v.shape[0] for v in joined) % ROW
            if pad:
                joined.append(ops.zeros((pad,), F32))
            matrices.append(ops.reshape(ops.concat(joined), (-1, ROW)))
        if self.fused_squares is not None:
            # one pass over each gradient on every thread, where Mul and two MatMuls take three
            return ops.reshape(ops.addn([self.fused_squares(m, self.threads) for m in matrices]), ())
        return ops.reshape(ops.addn([squares_summed(m) for m in matrices]), ())

    def sum_over_model_parallel(self, grads):
        """The shared gradients summed over the model-parallel group, in one all-reduce."""
        flat = self.sum_shares(ops.concat([ops.reshape(grads[i], (-1,)) for i in self.shared_grads]))
        parts = ops.split(flat, self.share_sizes)
        out = ()
        for i in range(len(grads)):
            slot = self.share_slot[i]
            out += (ops.reshape(parts[slot], self.share_shapes[slot]) if slot >= 0 else grads[i],)
        return out

    def mean_over_processes(self, loss, grads):
        # one all-reduce of a flat vector: per-tensor all-reduces cost a loopback round trip each on CPU
        flat = ops.concat([ops.reshape(loss, (1,))] + [ops.reshape(g, (-1,)) for g in grads])
        flat = self.all_reduce(flat) * self.inv_dp
        parts = ops.split(flat[1:], self.sizes)
        return flat[0], tuple(ops.reshape(p, shape) for p, shape in zip(parts, self.shapes))
