"""Child process of export_mindir: compiles and writes the two graphs of one rank into a scratch directory.

MINDIR node names carry a per-process compile counter, so exporting in a fresh process makes the same
inputs give the same normalised digest whatever the calling process compiled before. A tensor-parallel export runs
one such process per rank under msrun: each builds its slice of the network from the export strategy files and
its shard, and its graphs hold the all-reduces.
Usage: python -m qwenbuild.export.worker SPEC.json  (written by export_mindir; results or errors go to SPEC's paths)
"""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.logs import configure, entry_logger
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import num_parameters
from qwenbuild.parallel.rank_layout import process_layout
from qwenbuild.processes import follow_parent
from qwenbuild.weights.mindspore_ckpt import load_with_crc

# started as `python -m`, this module is __main__: its lines go under its package name all the same
logger = entry_logger(__file__)

VERBOSE = True


def _log(message: str) -> None:
    if VERBOSE:
        logger.info(f"export: {message}")


def _network(cfg, ckpt_path: str, layout):
    # the network loads mindspore (seconds): imported only when this runs
    from qwenbuild.model.network import QwenForCausalLM, set_weights
    from qwenbuild.model.tensor_parallel import ModelParallel

    net = QwenForCausalLM(cfg, ModelParallel(layout))
    try:
        set_weights(net, load_with_crc(ckpt_path), ckpt_path)
    except UserError as exc:
        if "wrong shape" not in str(exc) or layout is not None:
            raise
        raise UserError(f"{exc}\n  note: when this is a shard of a tensor-parallel plan, its tensors are slices",
                        hint="export the complete checkpoint, or the directory of shards with --model_parallel "
                             "and --strategy_dir") from None
    net.set_train(False)
    return net


def _export(cell, inputs, target: Path, external_weights: bool) -> Path:
    """ms.export into target.parent as rank_N_graph.mindir (+ rank_N_variables/), whatever size MindSpore picks."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms
    from mindspore.train import serialization

    prefix = target.name[: -len("_graph.mindir")]
    total_save = serialization.TOTAL_SAVE
    if external_weights:
        # MindSpore splits weights out above TOTAL_SAVE KiB; 0 forces the original's rank_N_variables/ directory
        serialization.TOTAL_SAVE = 0
    try:
        ms.export(cell, *inputs, file_name=str(target.parent / prefix), file_format="MINDIR")
    finally:
        serialization.TOTAL_SAVE = total_save
    together = target.parent / f"{prefix}.mindir"
    if together.exists():
        together.rename(target)
    if not target.exists():
        raise RuntimeError(f"MindSpore wrote neither {together.name} nor {target.name} in {target.parent}")
    return target


def _rank_and_layout(spec: dict):
    """(rank, layout): a single process, or this msrun worker's rank of a tensor-parallel export."""
    if spec["model_parallel"] == 1:
        return spec["rank"], None
    follow_parent()
    # mindspore takes seconds to load: imported only when this runs
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, world = get_rank(), get_group_size()
    if world != spec["model_parallel"]:
        raise UserError(f"the export has model_parallel {spec['model_parallel']} but {world} processes started")
    return rank, process_layout(spec["strategy_dir"], rank, world, 1)


def run(spec: dict, rank: int, layout) -> dict:
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    from qwenbuild.model.kv_cache import DecodeGraph, PrefillGraph, graph_inputs

    mine = spec["ranks"][str(rank)]
    cfg = QwenConfig(**spec["cfg"])
    b, s = spec["batch_size"], spec["seq_length"]
    t0 = time.perf_counter()
    _log(f"rank {rank}: loading {mine['ckpt_path']}")
    net = _network(cfg, mine["ckpt_path"], layout)
    share = f" (its slice of 1/{spec['model_parallel']})" if spec["model_parallel"] > 1 else ""
    _log(f"rank {rank}: loaded {num_parameters(cfg):,} parameters{share} in {time.perf_counter() - t0:.1f} s")
    net.fuse_projections()  # the graphs hold w_qkv and w_gate_hidden, as MindFormers' qkv_concat exports them
    graphs = {"full": PrefillGraph(net, b, s), "inc": DecodeGraph(net, b, s)}
    written = {}
    for kind, cell in graphs.items():
        t = time.perf_counter()
        target = Path(mine["scratch"][kind]) / mine["graph_name"]
        _export(cell, graph_inputs(b, s, kind), target, spec["external_weights"])
        written[kind] = str(target)
        _log(f"rank {rank}: {kind} graph [{b}, {s if kind == 'full' else 1}] written in "
             f"{time.perf_counter() - t:.1f} s")
    return {"written": written, "mindspore_version": ms.__version__}


def main(argv: list[str]) -> int:
    global VERBOSE
    spec = json.loads(Path(argv[0]).read_text())
    VERBOSE = spec.get("verbose", True)
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    rank = spec.get("rank", 0)
    try:
        rank, layout = _rank_and_layout(spec)
        result = run(spec, rank, layout)
    except UserError as exc:
        Path(spec["ranks"][str(rank)]["error_file"]).write_text(str(exc))
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        Path(spec["ranks"][str(rank)]["error_file"]).write_text(
            f"no space left while writing the graphs under {spec['out_root']} ({exc.strerror}); nothing was "
            "changed there\n  hint: free disk space or point the output elsewhere, then run again")
        return 2
    Path(spec["ranks"][str(rank)]["result_file"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    configure()  # this process's lines in its msrun log, at the level QWENBUILD_LOG asks for
    sys.exit(main(sys.argv[1:]))
