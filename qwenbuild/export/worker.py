"""Child process of export_mindir: compiles and writes the two graphs of one rank into a scratch directory.

MINDIR node names carry a per-process compile counter, so exporting in a fresh process makes the same
inputs give the same normalised digest whatever the calling process compiled before.
Usage: python -m qwenbuild.export.worker SPEC.json  (written by export_mindir; result or error goes to SPEC's paths)
"""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import num_parameters
from qwenbuild.weights.mindspore_ckpt import load_weights

VERBOSE = True


def _log(message: str) -> None:
    if VERBOSE:
        print(f"export: {message}", file=sys.stderr, flush=True)


def _load(cfg, ckpt_path: str):
    # the network loads mindspore (seconds): imported only when this runs
    from qwenbuild.model.network import QwenForCausalLM

    net = QwenForCausalLM(cfg)
    try:
        load_weights(net, ckpt_path)
    except UserError as exc:
        if "wrong shape" not in str(exc):
            raise
        raise UserError(f"{exc}\n  note: when this is a rank's shard of a tensor-parallel (mp>1) plan, its tensors "
                        f"are slices, and MindSpore compiles sliced graphs only on Ascend/GPU",
                        hint="on CPU export the complete checkpoint (or an mp=1 shard) instead") from None
    net.set_train(False)
    return net


def _export(cell, inputs, target: Path, external_weights: bool) -> Path:
    """ms.export into target.parent as rank_N_graph.mindir (+ rank_N_variables/), whatever size MindSpore picks."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms
    from mindspore.train import serialization

    prefix = target.name[: -len("_graph.mindir")]
    if external_weights:
        # MindSpore splits weights out above TOTAL_SAVE KiB; 0 forces the original's rank_N_variables/ directory
        serialization.TOTAL_SAVE = 0
    ms.export(cell, *inputs, file_name=str(target.parent / prefix), file_format="MINDIR")
    together = target.parent / f"{prefix}.mindir"
    if together.exists():
        together.rename(target)
    if not target.exists():
        raise RuntimeError(f"MindSpore wrote neither {together.name} nor {target.name} in {target.parent}")
    return target


def run(spec: dict) -> dict:
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms
    from mindspore import Tensor

    from qwenbuild.model.network import DecodeCell, PrefillCell, cache_shape

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = QwenConfig(**spec["cfg"])
    b, s = spec["batch_size"], spec["seq_length"]
    t0 = time.perf_counter()
    _log(f"loading {spec['ckpt_path']}")
    net = _load(cfg, spec["ckpt_path"])
    _log(f"loaded {num_parameters(cfg):,} parameters in {time.perf_counter() - t0:.1f} s")
    ids_full = Tensor(np.ones((b, s), np.int32))
    ids_inc = Tensor(np.ones((b, 1), np.int32))
    valid = Tensor(np.ones((b,), np.int32))
    cache = Tensor(np.zeros(cache_shape(cfg, b, s), np.float32))
    graphs = {
        "full": (PrefillCell(net, s), (ids_full, valid)),
        "inc": (DecodeCell(net, s), (ids_inc, valid, cache, cache)),
    }
    written = {}
    for kind, (cell, inputs) in graphs.items():
        t = time.perf_counter()
        target = Path(spec["scratch"][kind]) / spec["graph_name"]
        _export(cell, inputs, target, spec["external_weights"])
        written[kind] = str(target)
        _log(f"{kind} graph [{b}, {s if kind == 'full' else 1}] written in {time.perf_counter() - t:.1f} s")
    return {"written": written, "mindspore_version": ms.__version__}


def main(argv: list[str]) -> int:
    global VERBOSE
    spec = json.loads(Path(argv[0]).read_text())
    VERBOSE = spec.get("verbose", True)
    try:
        result = run(spec)
    except UserError as exc:
        Path(spec["error_file"]).write_text(str(exc))
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        Path(spec["error_file"]).write_text(
            f"no space left while writing the graphs under {spec['out_root']} ({exc.strerror}); nothing was "
            "changed there\n  hint: free disk space or point the output elsewhere, then run again")
        return 2
    Path(spec["result_file"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
