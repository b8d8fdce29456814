"""The fused CPU kernels (SwiGLU, RoPE, RMSNorm, masked softmax, cross entropy, sum of squares): built once per machine, forward and gradient equal to the formulas
at shapes no fixture uses, in both MindSpore modes; without a compiler the composed kernels run; exported graphs
never hold them."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from qwenbuild.model.fused_kernels import SWITCH, build_library, build_record, kernels, source

SYMBOLS = ("SwigluForward", "SwigluBackward", "RopeForward", "RopeBackward", "RmsNormForward", "RmsNormBackward",
           "MaskedSoftmaxForward", "SoftmaxBackward", "CrossEntropyForward", "CrossEntropyBackward", "SumOfSquares",
           "AdamWUpdate")


@pytest.fixture(params=["GRAPH", "PYNATIVE"])
def mode(request):
    ms.set_context(mode=getattr(ms, f"{request.param}_MODE"), device_target="CPU")
    yield request.param
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="module")
def fused():
    found = kernels()
    assert found is not None, "g++ is installed here: the fused kernels must build"
    return found


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


def _value_and_grads(op, inputs, weights, wrt):
    """op(*inputs) (its first output when several) and the gradients of sum(output * weights) for inputs `wrt`."""
    def weighted(*args):
        out = op(*args)
        return ((out[0] if isinstance(out, tuple) else out) * weights).sum()

    out = op(*inputs)
    grads = ops.grad(weighted, wrt)(*inputs)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return (out[0] if isinstance(out, tuple) else out).asnumpy(), [g.asnumpy() for g in grads]


def test_library_is_built_once_and_named_by_what_it_was_built_from(tmp_path):
    first = build_library(shutil.which("g++"), tmp_path)
    built = first.stat().st_mtime_ns
    again = build_library(shutil.which("g++"), tmp_path)
    assert again == first and again.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no build directory left behind
    library = ctypes.CDLL(str(first))
    assert all(hasattr(library, name) for name in SYMBOLS)


def test_swiglu_and_its_gradient_equal_the_formula(fused, mode):
    rng = np.random.default_rng(0)
    gate, up, w = (rng.normal(scale=3.0, size=(7, 45)).astype(np.float32) for _ in range(3))
    out, (d_gate, d_up) = _value_and_grads(fused.swiglu, (Tensor(gate), Tensor(up)), Tensor(w), (0, 1))
    s = _sigmoid(gate)
    np.testing.assert_allclose(out, gate * s * up, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_up, w * gate * s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_gate, w * up * s * (1 + gate * (1 - s)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("table_rows", [1, 3])
def test_rope_and_its_gradient_equal_the_formula(fused, mode, table_rows):
    """x [B, S, H, D]; one table for every row of the batch, or one per row."""
    rng = np.random.default_rng(1)
    x, w = (rng.normal(size=(3, 5, 4, 6)).astype(np.float32) for _ in range(2))
    cos, sin = (rng.normal(size=(table_rows, 5, 4, 6)).astype(np.float32) for _ in range(2))
    out, (dx,) = _value_and_grads(fused.rope, (Tensor(x), Tensor(cos), Tensor(sin)), Tensor(w), (0,))
    np.testing.assert_allclose(out, x * cos + _rotate_half(x) * sin, rtol=1e-5, atol=1e-6)
    # rotate_half is linear with transpose -rotate_half
    np.testing.assert_allclose(dx, w * cos - _rotate_half(w * sin), rtol=1e-5, atol=1e-6)


def test_rms_norm_and_its_gradients_equal_the_formula(fused, mode):
    rng = np.random.default_rng(2)
    x, dy = (rng.normal(size=(9, 40)).astype(np.float32) for _ in range(2))
    weight = rng.normal(1.0, 0.3, size=40).astype(np.float32)
    eps = 1e-6
    out, (dx, dw) = _value_and_grads(fused.rms_norm, (Tensor(x), Tensor(weight), Tensor(eps, ms.float32)),
                                     Tensor(dy), (0, 1))
    x64, dy64, w64 = x.astype(np.float64), dy.astype(np.float64), weight.astype(np.float64)
    r = 1.0 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps)
    n = x64 * r
    np.testing.assert_allclose(out, n * w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, (dy64 * n).sum(0), rtol=1e-5, atol=1e-5)
    g = dy64 * w64
    np.testing.assert_allclose(dx, r * (g - n * (g * n).mean(-1, keepdims=True)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_matrices", [1, 3])
def test_masked_softmax_and_its_gradient_equal_the_formula(fused, mode, bias_matrices):
    """scores [B, KV, rep, Sq, Sk] with a bias shared by every matrix, or one per row of the batch (decoding)."""
    rng = np.random.default_rng(3)
    x, w = (rng.normal(scale=4.0, size=(3, 2, 2, 5, 7)).astype(np.float32) for _ in range(2))
    bias = np.where(rng.random((bias_matrices, 1, 1, 5, 7)) < 0.3, -1.0e30, 0.0).astype(np.float32)
    bias[..., 0] = 0.0  # every row sees one position
    out, (dx,) = _value_and_grads(fused.masked_softmax, (Tensor(x), Tensor(bias)), Tensor(w), (0,))
    z = x.astype(np.float64) + bias
    y = np.exp(z - z.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-7)
    # float32 rounding of w - sum(w y) with |w| up to 4: about 1e-6
    np.testing.assert_allclose(dx, y * (w - (w * y).sum(-1, keepdims=True)), rtol=1e-5, atol=4e-6)
    assert np.all(dx[np.broadcast_to(bias, x.shape) < 0] == 0.0)


@pytest.mark.parametrize("rows, vocab", [(6, 11), (40, 151_936)])
def test_cross_entropy_and_its_gradient_equal_the_formula(fused, mode, rows, vocab):
    """Per-row loss lse - logit[label] and its gradient softmax - onehot, one thread or split over two (Qwen's vocab)."""
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(rows, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=rows).astype(np.int32)
    dloss = rng.normal(size=rows).astype(np.float32)
    out, (dlogits,) = _value_and_grads(fused.cross_entropy, (Tensor(logits), Tensor(labels), Tensor(2.0, ms.float32)),
                                       Tensor(dloss), (0,))
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(out, lse - x[np.arange(rows), labels], rtol=1e-5, atol=1e-5)
    expected = np.exp(x - lse[:, None])
    expected[np.arange(rows), labels] -= 1.0
    np.testing.assert_allclose(dlogits, expected * dloss[:, None], rtol=1e-4, atol=1e-7)


def test_a_label_outside_the_vocabulary_is_refused(fused):
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    try:
        with pytest.raises(RuntimeError, match="CrossEntropyForward"):
            fused.cross_entropy(Tensor(np.zeros((2, 5), np.float32)), Tensor(np.array([1, 5], np.int32)),
                                Tensor(1.0, ms.float32))[0].asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("size", [1, 4097, 3_000_001])
def test_sum_of_squares_equals_numpy_in_double(fused, mode, size):
    x = np.random.default_rng(5).normal(scale=10.0, size=size).astype(np.float32)
    got = fused.sum_of_squares(Tensor(x), Tensor(2.0, ms.float32)).asnumpy()
    assert got.shape == (1, 1)
    np.testing.assert_allclose(got[0, 0], (x.astype(np.float64) ** 2).sum(), rtol=1e-6)


def test_other_dtypes_are_refused(fused):
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    try:
        with pytest.raises(RuntimeError, match="SwigluForward"):
            fused.swiglu(Tensor(np.ones((2, 3), np.float16)), Tensor(np.ones((2, 3), np.float16))).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


_PROBE = """
import mindspore as ms
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.network import FUSED, QwenForCausalLM
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
net = QwenForCausalLM(QwenConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, n_kv_heads=1,
                                 intermediate_size=32))
print(sorted({name for _, cell in net.cells_and_names() for name in FUSED if getattr(cell, name, None) is not None}))
"""


@pytest.mark.parametrize("env, said", [({"CXX": "/nonexistent/g++"}, "did not build"),
                                       ({"QWENBUILD_FUSED_KERNELS": "0"}, "")])
def test_without_the_kernels_the_network_keeps_the_composed_ones(tmp_path, env, said):
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (said in done.stderr) if said else "qwenbuild:" not in done.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_the_network_uses_them_where_they_build():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(["fused_norm", "fused_rope", "fused_softmax", "fused_swiglu"])


def test_the_build_record_names_the_compiler_and_the_target_native_means_here(tmp_path, monkeypatch):
    record = build_record()
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
    assert record["used"] is True and record["compiler"] == version.splitlines()[0]
    assert "-march=native" in record["flags"].split()
    # the recorded target is a real instruction-set name, which compiles the kernels without "native"
    assert record["march"] not in ("native", "unknown")
    obj = tmp_path / "k.o"
    subprocess.run(["g++", "-std=c++17", f"-march={record['march']}", "-c", str(source()),
                    "-o", str(obj)], check=True, timeout=300)
    monkeypatch.setenv(SWITCH, "0")
    assert build_record() == {"used": False, "why": f"{SWITCH}=0"}
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert build_record()["used"] is False and "/nonexistent/g++" in build_record()["why"]
