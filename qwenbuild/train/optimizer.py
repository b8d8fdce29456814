"""AdamW as the Qwen1.5 recipe uses it: decoupled weight decay, bias-corrected fp32 moments adam_m.* / adam_v.*."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from qwenbuild.model.fused_kernels import kernels

_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register(*["Tensor"] * 12)
def _adamw_update(lr, weight_decay, beta1, beta2, eps, bias1, bias2, scale, param, m, v, grad):
    """The update spelled out, for parameters the fused kernels do not take (float16)."""
    grad = ops.cast(grad, ms.float32) * scale
    new_m = beta1 * m + (1.0 - beta1) * grad
    new_v = beta2 * v + (1.0 - beta2) * ops.square(grad)
    decayed = ops.cast(param, ms.float32) * (1.0 - lr * weight_decay)
    update = (new_m / bias1) / (ops.sqrt(new_v / bias2) + eps)
    new_param = decayed - lr * update
    ops.assign(m, new_m)
    ops.assign(v, new_v)
    ops.assign(param, ops.cast(new_param, param.dtype))
    return new_param


def decays(param: Parameter) -> bool:
    """Whether weight decay applies to a parameter, by MindFormers' rule (get_optimizer_grouped_parameters): not to
    1-D ones (norm weights, biases), so that both engines train alike."""
    return len(param.shape) > 1


# from this many elements a parameter takes Adam + an in-place decay (two multi-threaded kernels, about twice as fast
# as AdamWeightDecay's one single-threaded kernel on CPU); smaller ones are launch-bound and take one kernel
TWO_KERNELS_FROM = 1 << 16


def _zeros_like(param: Parameter, prefix: str) -> Parameter:
    # moments stay float32 whatever the parameter dtype, as in the original recipe
    return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=f"{prefix}.{param.name}", requires_grad=False)


class AdamW(nn.Cell):
    """One AdamW step per call on the gradients times `scale` (the clipping factor); the learning rate comes in as an
    input so the schedule stays outside the graph.

    float32 parameters take qwenbuild's fused AdamW kernel where it built (`fused_kernels`): the whole update,
    clipping included, in one pass over the parameter, its moments and its gradient. Otherwise MindSpore's kernels:
    large ones are decayed in place first (p -= lr * weight_decay * p, as torch's AdamW does), then take the Adam
    kernel, which corrects the learning rate by the step's beta powers; its epsilon is scaled by sqrt(c2) to sit where
    AdamW's does: (m / c1) / (sqrt(v / c2) + eps) = (sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2)). Small ones take
    AdamWeightDecay, which has no bias correction: it is folded into its learning rate, epsilon and decay the same
    way, the decay scaled so that lr * decay stays the recipe's.
    """

    def __init__(self, params, weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8, fused: bool = True,
                 decayed=None):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        # which parameters weight decay applies to (default: all); the others take the update without it
        self.decayed = tuple(decayed) if decayed is not None else (True,) * len(self.params)
        self.no_decay = Tensor(0.0, ms.float32)
        self.moments1 = ms.ParameterTuple(_zeros_like(p, "adam_m") for p in self.params)
        self.moments2 = ms.ParameterTuple(_zeros_like(p, "adam_v") for p in self.params)
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        found = kernels() if fused else None
        self.fused_update = found.adamw if found else None
        # the kernel splits a large parameter over as many threads as MindSpore's own kernels use
        self.threads = Tensor(float(ms.get_context("runtime_num_threads") or 1), ms.float32)
        float32 = [p.dtype == ms.float32 for p in self.params]
        two_kernels = [int(np.prod(p.shape)) >= TWO_KERNELS_FROM for p in self.params]
        self.in_place = tuple(i for i, f in enumerate(float32) if f and found)
        self.decayed_adam = tuple(i for i, f in enumerate(float32) if f and two_kernels[i] and not found)
        self.adam_weight_decay = tuple(i for i, f in enumerate(float32) if f and not two_kernels[i] and not found)
        self.spelled = tuple(i for i, f in enumerate(float32) if not f)
        self.spelled_groups = tuple((d, group) for d in (True, False)
                                    if (group := tuple(i for i in self.spelled if self.decayed[i] == d)))
        self.weight_decay_update = ops.AdamWeightDecay()
        self.adam = ops.Adam()
        self.decay = ops.ApplyGradientDescent()
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr, scale):
        step = ops.cast(self.global_step + 1, ms.float32)
        power1, power2 = ops.pow(self.beta1, step), ops.pow(self.beta2, step)
        bias1, bias2 = 1.0 - power1, 1.0 - power2
        root2 = ops.sqrt(bias2)
        fused_lr, fused_eps, fused_decay = lr * root2 / bias1, self.eps * root2, self.weight_decay * bias1 / root2
        lr_decay = lr * self.weight_decay
        done = ()
        if self.in_place:
            hyper = ops.stack([scale, self.beta1, self.beta2, 1.0 - lr_decay, fused_lr, fused_eps, self.threads])
            undecayed = ops.stack([scale, self.beta1, self.beta2, 1.0 - self.no_decay, fused_lr, fused_eps,
                                   self.threads])
            for i in self.in_place:
                done += (self.fused_update(self.params[i], self.moments1[i], self.moments2[i], grads[i],
                                           hyper if self.decayed[i] else undecayed),)
        for i in self.decayed_adam:
            grad = grads[i] * scale
            if self.decayed[i]:
                # p -= (lr * weight_decay) * p in place: one kernel, where a Mul and an Assign take two passes
                grad = ops.depend(grad, self.decay(self.params[i], lr_decay, self.params[i]))
            done += (self.adam(self.params[i], self.moments1[i], self.moments2[i], power1, power2, lr, self.beta1,
                               self.beta2, fused_eps, grad)[0],)
        for i in self.adam_weight_decay:
            done += (self.weight_decay_update(self.params[i], self.moments1[i], self.moments2[i], fused_lr,
                                              self.beta1, self.beta2, fused_eps,
                                              fused_decay if self.decayed[i] else self.no_decay,
                                              grads[i] * scale)[0],)
        for with_decay, spelled in self.spelled_groups:
            params, moments1, moments2, spelled_grads = (), (), (), ()
            for i in spelled:
                params += (self.params[i],)
                moments1 += (self.moments1[i],)
                moments2 += (self.moments2[i],)
                spelled_grads += (grads[i],)
            weight_decay = self.weight_decay if with_decay else self.no_decay
            done += self.hyper_map(ops.partial(_adamw, lr, weight_decay, self.beta1, self.beta2, self.eps,
                                               bias1, bias2, scale), params, moments1, moments2, spelled_grads)
        return ops.depend(done, ops.assign_add(self.global_step, ops.ones((), ms.int32)))
