"""AdamW as the Qwen1.5 recipe uses it: decoupled weight decay, bias-corrected fp32 moments adam_m.* / adam_v.*."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register(*["Tensor"] * 11)
def _adamw_update(lr, weight_decay, beta1, beta2, eps, bias1, bias2, param, m, v, grad):
    grad = ops.cast(grad, ms.float32)
    new_m = beta1 * m + (1.0 - beta1) * grad
    new_v = beta2 * v + (1.0 - beta2) * ops.square(grad)
    decayed = ops.cast(param, ms.float32) * (1.0 - lr * weight_decay)
    update = (new_m / bias1) / (ops.sqrt(new_v / bias2) + eps)
    new_param = decayed - lr * update
    ops.assign(m, new_m)
    ops.assign(v, new_v)
    ops.assign(param, ops.cast(new_param, param.dtype))
    return new_param


def _zeros_like(param: Parameter, prefix: str) -> Parameter:
    # moments stay float32 whatever the parameter dtype, as in the original recipe
    return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=f"{prefix}.{param.name}", requires_grad=False)


class AdamW(nn.Cell):
    """One AdamW step per call; the learning rate comes in as an input so the schedule stays outside the graph."""

    def __init__(self, params, weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.moments1 = ms.ParameterTuple(_zeros_like(p, "adam_m") for p in self.params)
        self.moments2 = ms.ParameterTuple(_zeros_like(p, "adam_v") for p in self.params)
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr):
        step = ops.cast(self.global_step + 1, ms.float32)
        bias1 = 1.0 - ops.pow(self.beta1, step)
        bias2 = 1.0 - ops.pow(self.beta2, step)
        out = self.hyper_map(ops.partial(_adamw, lr, self.weight_decay, self.beta1, self.beta2, self.eps, bias1, bias2),
                             self.params, self.moments1, self.moments2, grads)
        ops.assign_add(self.global_step, ops.ones((), ms.int32))
        return out
