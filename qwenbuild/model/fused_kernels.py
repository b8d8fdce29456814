"""Fused CPU kernels for training as MindSpore Custom (aot) ops: SwiGLU, RoPE, RMSNorm, the attention's masked
softmax and the loss's cross entropy with their gradients, the gradients' sum of squares for clipping, and the AdamW
update of a parameter in place.

Each is one pass over memory where MindSpore's composed CPU kernels take four to nine. The C++ source ships in the
package (resources/fused_kernels.cc); g++ compiles it once per machine into the user's cache directory. Without a
compiler, on another device target, or with QWENBUILD_FUSED_KERNELS=0, `kernels()` is None and the network keeps
the composed kernels. Exported graphs never hold these ops: MindSpore Lite cannot run them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qwenbuild.processes import run_child

logger = logging.getLogger(__name__)

SWITCH = "QWENBUILD_FUSED_KERNELS"
# -ffast-math lets g++ call the vectorised expf; it is left out of the link, which would turn on flush-to-zero for
# the whole process
COMPILE = ["-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC", "-pthread"]
LINK = ["-shared", "-pthread"]


def source() -> Path:
    return Path(str(resources.files("qwenbuild") / "resources" / "fused_kernels.cc"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenbuild" / "kernels"


def _cpu_flags() -> str:
    # -march=native: a library built on one CPU may not run on another sharing the cache directory
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _run(cmd: list[str]) -> str:
    """The command's output; an interruption stops it, a failure is a RuntimeError with its last words."""
    done = run_child(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def build_library(compiler: str, directory: Path) -> Path:
    """The compiled library in `directory`, named by what it was built from; compiled there first if missing."""
    code = source().read_bytes()
    version = _run([compiler, "--version"])
    key = hashlib.sha256(b"\0".join(part.encode() if isinstance(part, str) else part for part in
                                    (code, " ".join(COMPILE + LINK), version, _cpu_flags()))).hexdigest()[:16]
    library = directory / f"fused_kernels-{key}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # built beside its final name and renamed: processes compiling at once never load a half-written file
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
        obj, lib = Path(work) / "fused_kernels.o", Path(work) / "fused_kernels.so"
        _run([compiler, *COMPILE, "-c", str(source()), "-o", str(obj)])
        _run([compiler, *LINK, str(obj), "-o", str(lib)])
        os.replace(lib, library)
    return library


def compiler_path() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def build_record() -> dict:
    """How training on this machine gets its fused kernels: the compiler and the instruction set -march=native
    targets here (qwen.lock records it: the kernels' float results follow both), or why they are not used."""
    if os.environ.get(SWITCH, "1") == "0":
        return {"used": False, "why": f"{SWITCH}=0"}
    compiler = compiler_path()
    if not compiler:
        return {"used": False, "why": "no C++ compiler"}
    try:
        version = _run([compiler, "--version"]).splitlines()[0]
        target = _run([compiler, *COMPILE, "-Q", "--help=target"])
    except (OSError, RuntimeError, IndexError) as e:
        return {"used": False, "why": f"{compiler} does not run ({e})"}
    march = next((line.split()[-1] for line in target.splitlines() if line.strip().startswith("-march=")), "unknown")
    return {"used": True, "compiler": version, "march": march, "flags": " ".join(COMPILE)}


@dataclass(frozen=True)
class Kernels:
    """The forward ops, each carrying its gradient (a second Custom op) as its bprop, and the optimizer update."""
    swiglu: object
    rope: object
    rms_norm: object
    masked_softmax: object
    cross_entropy: object
    sum_of_squares: object
    adamw: object


def _ops(library: Path) -> Kernels:
    # mindspore takes seconds to load: imported only when this runs
    from mindspore import ops

    def custom(name, shape, dtype, bprop=None):
        return ops.Custom(f"{library}:{name}", out_shape=shape, out_dtype=dtype, func_type="aot", bprop=bprop)

    swiglu_grad = custom("SwigluBackward", lambda g, u, dy: (g, g), lambda g, u, dy: (g, g))
    rope_grad = custom("RopeBackward", lambda dy, c, s: dy, lambda dy, c, s: dy)
    rms_norm_grad = custom("RmsNormBackward", lambda x, w, r, dy: (x, w), lambda x, w, r, dy: (x, w))

    def swiglu_bprop(gate, up, out, dout):
        return swiglu_grad(gate, up, dout)

    def rope_bprop(x, cos, sin, out, dout):
        # the tables come from positions, never from parameters
        return rope_grad(dout, cos, sin), ops.zeros_like(cos), ops.zeros_like(sin)

    def rms_norm_bprop(x, weight, eps, out, dout):
        dx, dw = rms_norm_grad(x, weight, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)

    softmax_grad = custom("SoftmaxBackward", lambda y, dy: y, lambda y, dy: y)

    def masked_softmax_bprop(x, bias, out, dout):
        # the bias is the attention mask, never a parameter
        return softmax_grad(out, dout), ops.zeros_like(bias)

    cross_entropy_grad = custom("CrossEntropyBackward", lambda x, y, lse, d, t: x, lambda x, y, lse, d, t: x)

    def cross_entropy_bprop(logits, labels, threads, out, dout):
        # lse (out[1]) is read only by the gradient: its own gradient is never asked for
        return (cross_entropy_grad(logits, labels, out[1], dout[0], threads), ops.zeros_like(labels),
                ops.zeros_like(threads))

    adamw = custom("AdamWUpdate", lambda p, m, v, g, h: [1], lambda p, m, v, g, h: p)
    # it writes the parameter and moments it is given: ordered with other reads and writes, never pruned
    adamw.add_prim_attr("side_effect_mem", True)
    return Kernels(
        adamw=adamw,
        swiglu=custom("SwigluForward", lambda g, u: g, lambda g, u: g, swiglu_bprop),
        rope=custom("RopeForward", lambda x, c, s: x, lambda x, c, s: x, rope_bprop),
        rms_norm=custom("RmsNormForward", lambda x, w, e: (x, list(x[:-1]) + [1]), lambda x, w, e: (x, x),
                        rms_norm_bprop),
        masked_softmax=custom("MaskedSoftmaxForward", lambda x, b: x, lambda x, b: x, masked_softmax_bprop),
        cross_entropy=custom("CrossEntropyForward", lambda x, y, t: (y, y), lambda x, y, t: (x, x),
                             cross_entropy_bprop),
        sum_of_squares=custom("SumOfSquares", lambda x, t: [1, 1], lambda x, t: x))


@functools.cache
def kernels() -> Kernels | None:
    """The fused ops for this process, or None (the reason is printed once) where the composed kernels stay."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    if os.environ.get(SWITCH, "1") == "0" or ms.get_context("device_target") != "CPU":
        return None
    compiler = compiler_path()
    if not compiler:
        logger.warning("qwenbuild: no C++ compiler (g++) found: training runs SwiGLU, RoPE and RMSNorm as MindSpore's "
                       "composed kernels, which are slower; install g++ to have them fused")
        return None
    try:
        return _ops(build_library(compiler, cache_dir()))
    except (OSError, RuntimeError) as e:
        logger.warning(f"qwenbuild: the fused CPU kernels did not build ({e}); training keeps MindSpore's composed "
                       "kernels")
        return None
