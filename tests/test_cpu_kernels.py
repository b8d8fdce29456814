"""The training graph's CPU-shaped pieces (spread operands, softmax gradient) give the same values as the plain ops,
and a whole training gradient at a size that uses them equals torch's, with the fused kernels and without."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn, ops

from hf_tiny import tiny_hf_model
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.cpu_kernels import SPREAD_FROM, Softmax, add_bias, large
from qwenbuild.model.network import MASKED, QwenForCausalLM, RMSNorm, use_composed_kernels
from qwenbuild.model.params import ms_to_hf
from qwenbuild.train.step import CausalLMLoss
from qwenbuild.weights import convert_weight
from qwenbuild.weights.mindspore_ckpt import load_weights


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class _Grad(nn.Cell):
    """d/dx of sum(f(x) * w)."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.grad = ops.GradOperation()

    def construct(self, x, w):
        return self.grad(self._weighted)(x, w)

    def _weighted(self, x, w):
        return (self.f(x) * w).sum()


class _PlainSoftmax(nn.Cell):
    def construct(self, x):
        return ops.softmax(x, -1)


def test_softmax_gradient_equals_the_expanded_one_with_masked_entries():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 2, 8, 8)).astype(np.float32)
    x += np.triu(np.full((8, 8), MASKED, np.float32), 1)  # causal: future positions masked
    w = Tensor(rng.normal(size=x.shape).astype(np.float32))
    ours = _Grad(Softmax())(Tensor(x), w).asnumpy()
    plain = _Grad(_PlainSoftmax())(Tensor(x), w).asnumpy()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, plain, atol=1e-6, rtol=0)
    assert (ours[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0).all()


def test_spread_rmsnorm_and_bias_equal_numpy():
    rng = np.random.default_rng(1)
    rows, width = 2 * SPREAD_FROM // 48, 48
    assert large(rows, width)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    weight = rng.normal(1.0, 0.2, size=width).astype(np.float32)
    norm = RMSNorm(width, 1e-6, ms.float32)
    use_composed_kernels(norm)
    norm.weight.set_data(Tensor(weight))
    expected = weight * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(norm(Tensor(x[None])).asnumpy()[0], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(add_bias(Tensor(x), Tensor(weight)).asnumpy(), x + weight)


@pytest.mark.parametrize("kernels", ["fused", "composed"])
def test_training_gradients_where_operands_are_spread_equal_torch(tmp_path, kernels):
    hf = tiny_hf_model(tmp_path / "hf")  # random biases and norm weights: every spread path carries gradient
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    cfg = QwenConfig.from_hf_dir(tmp_path / "hf")
    batch, seq = 4, 160
    # rows x hidden, the scores and the q|k|v outputs are all above the threshold: the spread paths run
    assert large(batch * seq, cfg.hidden_size)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    net = QwenForCausalLM(cfg)
    if kernels == "composed":
        use_composed_kernels(net)
    load_weights(net, tmp_path / "model.ckpt")
    weights = net.trainable_params()
    loss, grads = ops.value_and_grad(CausalLMLoss(net), None, weights)(Tensor(ids), Tensor(ids))

    hf.train()
    logits = hf(input_ids=torch.from_numpy(ids[:, :-1].astype(np.int64))).logits
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               torch.from_numpy(ids[:, 1:].astype(np.int64)).reshape(-1))
    theirs.backward()
    assert abs(float(loss.asnumpy()) - float(theirs.detach())) < 1e-5
    hf_params = dict(hf.named_parameters())
    for w, g in zip(weights, grads):
        expected = hf_params[ms_to_hf(w.name)].grad.numpy()
        np.testing.assert_allclose(g.asnumpy(), expected, atol=2e-6, rtol=1e-4, err_msg=w.name)
