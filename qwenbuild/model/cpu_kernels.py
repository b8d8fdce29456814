"""Element-wise work shaped for MindSpore's CPU kernels at training sizes.

A Mul or Add that broadcasts a vector over a matrix runs about five times slower than the same op on two equal
shapes (and its gradient adds a slow ReduceSum), so large operands are spread to full size by a MatMul against
ones first, whose gradient is a MatMul too. The softmax gradient MindSpore expands is four kernels with a slow
row sum; LogSoftmaxGrad does the same sum in one kernel.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.operations import _grad_ops

F32 = ms.float32
# below this many elements broadcasting is cheaper than the extra kernel (decoding a token is launch-bound)
SPREAD_FROM = 1 << 14

_matmul = ops.MatMul()


def large(rows: int, width: int) -> bool:
    return rows * width >= SPREAD_FROM


def over_rows(vector, rows: int):
    """vector [W] -> [rows, W], every row a copy."""
    return _matmul(ops.ones((rows, 1), F32), ops.reshape(vector, (1, -1)))


def over_columns(column, width: int):
    """column [N, 1] -> [N, width], every column a copy."""
    return _matmul(column, ops.ones((1, width), F32))


def row_means(x):
    """x [N, W] -> the mean of each row [N, 1], as a MatMul (ReduceMean's gradient is a slow Tile)."""
    return _matmul(x, ops.fill(F32, (x.shape[1], 1), 1.0 / x.shape[1]))


def squares_summed(x):
    """sum(x * x) of x [N, W] as [1, 1]: column sums by a MatMul against a row of ones, then their sum by one against
    a column. A [1, n] x [n, 1] dot runs on one thread and the reduction kernels are slower still: both take about
    five times as long."""
    squares = x * x
    return _matmul(_matmul(ops.ones((1, x.shape[0]), F32), squares), ops.ones((x.shape[1], 1), F32))


def add_bias(y, bias):
    """y [N, W] + bias [W]."""
    if not large(*y.shape):
        return y + bias
    return y + over_rows(bias, y.shape[0])


def silu(x):
    """x * sigmoid(x), whose gradient reuses the sigmoid (ops.silu's computes it again)."""
    return x * ops.sigmoid(x)


class Softmax(nn.Cell):
    """softmax over the last axis; its gradient y (dy - sum(dy y)) is LogSoftmaxGrad(log y, dy y)."""

    def __init__(self):
        super().__init__()
        self.log_softmax_grad = _grad_ops.LogSoftmaxGrad(-1)

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        # masked entries: out 0, log -inf, exp(-inf) 0: their gradient stays 0
        return (self.log_softmax_grad(ops.log(out), dout * out),)
