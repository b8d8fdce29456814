"""Export the prefill (full) and decode (inc) MINDIR graphs of one rank, under the original MindFormers file names."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from qwenbuild.digests import mindir_digest
from qwenbuild.errors import UserError
from qwenbuild.export.graph_files import FULL, KINDS, GraphDirs
from qwenbuild.export.sidecar import dump, sidecar
from qwenbuild.model.config import QwenConfig
from qwenbuild.export import worker
from qwenbuild.parallel.launch_scripts import local_msrun
from qwenbuild.processes import run_child
from qwenbuild.store import atomic_path, output_path, promote, refuse_in_the_way, remove, write_seal
from qwenbuild.tokenizer import load_tokenizer, pad_id, stop_ids
from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END, QWEN_SPECIAL_IDS

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 4096  # the graphs' inputs and KV cache are allocated for the whole batch at export time


def _check_args(cfg: QwenConfig, ckpt_path: Path, rank: int, batch_size: int, seq_length: int,
                model_parallel: int, strategy_dir) -> None:
    if model_parallel > 1:
        if strategy_dir is None or not Path(strategy_dir).is_dir():
            raise UserError(f"a model_parallel={model_parallel} export needs the export layout's strategy files, "
                            f"not {strategy_dir}", hint="write them with `qwenbuild strategy` (dp 1, mp "
                                                         f"{model_parallel}, pp 1)")
        if not ckpt_path.is_dir():
            raise UserError(f"a model_parallel={model_parallel} export takes a directory of shards "
                            f"(rank_N/<name>.ckpt), not {ckpt_path}",
                            hint="slice the checkpoint with `qwenbuild transform_ckpt` to the export strategy")
    elif not ckpt_path.is_file():
        raise UserError(f"checkpoint {ckpt_path} does not exist",
                        hint="convert one with `qwenbuild convert_weight` or point at a rank's shard")
    if not isinstance(rank, int) or rank < 0:
        raise UserError(f"rank must be a non-negative integer, not {rank!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"batch_size must lie in 1..{MAX_BATCH_SIZE}, not {batch_size!r}")
    if not isinstance(seq_length, int) or not 2 <= seq_length <= cfg.max_position_embeddings:
        raise UserError(f"seq_length {seq_length!r} must lie in 2..{cfg.max_position_embeddings} "
                        f"(max_position_embeddings of the model)")


def _worker_argv(spec: dict, work: Path) -> list[str]:
    """One fresh interpreter; a tensor-parallel export one per rank under msrun."""
    module = ["-m", worker.__name__, str(work / "spec.json")]
    if spec["model_parallel"] == 1:
        return [sys.executable] + module
    # msrun takes a leading `python` as the interpreter to start (found on PATH: this one's bin first)
    return local_msrun(spec["model_parallel"], work / "logs", ["python"] + module,
                       Path(sys.executable).parent)


def _run_worker(spec: dict) -> dict:
    """Run qwenbuild.export.worker (its working directory a temporary one); {rank: result}."""
    with tempfile.TemporaryDirectory(prefix="qwenbuild-export-") as work:
        work = Path(work)
        for rank, mine in spec["ranks"].items():
            mine.update(result_file=str(work / f"result_{rank}.json"), error_file=str(work / f"error_{rank}.txt"))
        (work / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        proc = run_child(_worker_argv(spec, work), cwd=work, stdin=subprocess.DEVNULL, env=env)
        for rank in spec["ranks"]:
            if (work / f"error_{rank}.txt").exists():
                raise UserError((work / f"error_{rank}.txt").read_text())
        missing = [r for r in spec["ranks"] if not (work / f"result_{r}.json").exists()]
        if proc.returncode != 0 or missing:
            logs = sorted((work / "logs").glob("worker_*.log")) if (work / "logs").is_dir() else []
            tail = "\n".join(logs[0].read_text(errors="replace").splitlines()[-15:]) if logs else ""
            raise UserError(f"MindSpore failed to export rank {missing[0] if missing else 0} (exit code "
                            f"{proc.returncode}); nothing was changed under {spec['out_root']}"
                            + (f"\n{tail}" if tail else ""), hint="see the MindSpore messages above")
        return {int(r): json.loads((work / f"result_{r}.json").read_text()) for r in spec["ranks"]}


def _promote_rank(dirs: GraphDirs, rank: int, scratch: dict[str, Path], docs: dict[str, dict]) -> None:
    # the sidecar marks completeness: drop the old ones first and write the new ones last
    for kind in KINDS:
        remove(dirs.sidecar_file(kind, rank))
    for kind in KINDS:
        new_vars = scratch[kind] / dirs.variables_dir(kind, rank).name
        final_vars = dirs.variables_dir(kind, rank)
        if new_vars.exists():
            write_seal(new_vars)  # qwenbuild's own: a later export may replace it
            promote(new_vars, final_vars)
        else:
            refuse_in_the_way(final_vars, directory=True)
            remove(final_vars)
        promote(scratch[kind] / dirs.graph_file(kind, rank).name, dirs.graph_file(kind, rank))
    for kind in KINDS:
        with atomic_path(dirs.sidecar_file(kind, rank)) as tmp:
            tmp.write_bytes(dump(docs[kind]))


def _missing_dirs(paths) -> list[Path]:
    """Directories that do not exist yet on the way to `paths`, deepest first (the order to remove them in)."""
    missing: dict[Path, None] = {}
    for path in paths:
        for d in [path, *path.parents]:
            if d.exists():
                break
            missing[d] = None
    return sorted(missing, key=lambda d: len(d.parts), reverse=True)


def export_mindir(cfg: QwenConfig, ckpt_path, out_root: str | Path | GraphDirs, rank: int = 0, batch_size: int = 1,
                  seq_length: int = 2048, *, tokenizer_dir=None, external_weights: bool = False,
                  model_parallel: int = 1, strategy_dir=None, progress=logger.info, inputs=()) -> dict:
    """Write out_root/mindir_{full,inc}_checkpoint/rank_N_graph.{mindir,json} (+ rank_N_variables/).

    out_root: the export root, or GraphDirs naming the full and inc directories themselves.
    ckpt_path: a complete MindSpore checkpoint (model_parallel 1: the graphs of `rank` hold the whole model), or
    with model_parallel > 1 a directory of shards rank_N/<name>.ckpt cut by the strategy files in strategy_dir
    (dp 1, mp model_parallel, pp 1): one process per rank under msrun writes that rank's tensor-parallel graphs.
    tokenizer_dir: where the sidecar's eos/pad ids come from; without it the Qwen1.5 ids are recorded when the
    vocabulary holds them.
    external_weights: write weights to rank_N_variables/ even below MindSpore's 1 GiB threshold (as the
    original's large models are written). inputs: further files the export is made from (the config's
    directory), which no output may be or lie in. Returns {"full"|"inc": {"mindir", "sidecar", "variables",
    "digest"}} of `rank` (model_parallel 1) or of rank 0, with "ranks": the summaries of every rank.
    """
    ckpt_path = Path(ckpt_path)
    dirs = out_root if isinstance(out_root, GraphDirs) else GraphDirs.under(out_root)
    _check_args(cfg, ckpt_path, rank, batch_size, seq_length, model_parallel, strategy_dir)
    for directory in (dirs.full.parent, dirs.full, dirs.inc):
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{directory} is a file, but the graphs go into a directory there",
                            hint="remove it or choose another --output_dir")
    ranks = list(range(model_parallel)) if model_parallel > 1 else [rank]
    _check_outputs(dirs, ranks, [ckpt_path, strategy_dir, tokenizer_dir, *inputs])
    eos_token_ids, pad_token_id = _special_ids(cfg, tokenizer_dir)
    t0 = time.perf_counter()
    tag = f".export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch = {r: {kind: dirs.dir(kind) / f".rank_{r}{tag}" for kind in KINDS} for r in ranks}
    made_here = _missing_dirs(dirs.dir(kind) for kind in KINDS)
    try:
        for paths in scratch.values():
            for path in paths.values():
                path.mkdir(parents=True)
        spec = {"cfg": dataclasses.asdict(cfg), "rank": rank, "model_parallel": model_parallel,
                "strategy_dir": str(Path(strategy_dir).resolve()) if strategy_dir else None,
                "out_root": str(dirs.full.parent), "batch_size": batch_size, "seq_length": seq_length,
                "external_weights": bool(external_weights), "verbose": progress is not None,
                "ranks": {str(r): {"ckpt_path": str(_rank_checkpoint(ckpt_path, r, model_parallel).resolve()),
                                   "graph_name": dirs.graph_file(FULL, r).name,
                                   "scratch": {k: str(p.resolve()) for k, p in scratch[r].items()}}
                          for r in ranks}}
        results = _run_worker(spec)
        docs, summaries = {}, {}
        for r in ranks:
            docs[r] = {kind: sidecar(kind, cfg, rank=r, batch_size=batch_size, seq_length=seq_length,
                                     model_parallel=model_parallel, eos_token_ids=eos_token_ids,
                                     pad_token_id=pad_token_id, source_checkpoint=ckpt_path.name,
                                     mindspore_version=results[r]["mindspore_version"],
                                     **_graph_facts(scratch[r][kind], dirs, kind, r))
                       for kind in KINDS}
            summaries[r] = {kind: _summary(scratch[r][kind], dirs, kind, r, docs[r][kind]) for kind in KINDS}
        for r in ranks:
            _promote_rank(dirs, r, scratch[r], docs[r])
    finally:
        for paths in scratch.values():
            for path in paths.values():
                remove(path)
        for directory in made_here:  # a failed first export leaves no empty graph directories behind
            with contextlib.suppress(OSError):
                directory.rmdir()
    summary = dict(summaries[ranks[0]], ranks=summaries)
    if progress:
        size = sum(s[k]["bytes"] for s in summaries.values() for k in KINDS)
        which = f"rank {rank}" if model_parallel == 1 else f"{model_parallel} tensor-parallel ranks"
        progress(f"export {which}: full + inc {size / 1e6:.1f} MB, batch {batch_size} x seq {seq_length}, "
                 f"{'external weights, ' if summary['full']['variables'] else ''}"
                 f"{time.perf_counter() - t0:.1f} s -> {dirs.full.parent}")
    return summary


def _check_outputs(dirs: GraphDirs, ranks: list[int], inputs: list) -> None:
    """Every path an export writes may be written (store.output_path), before MindSpore starts."""
    for r in ranks:
        for kind in KINDS:
            output_path(dirs.graph_file(kind, r), inputs=inputs)
            output_path(dirs.sidecar_file(kind, r), inputs=inputs)
            output_path(dirs.variables_dir(kind, r), directory=True, inputs=inputs)


def _rank_checkpoint(ckpt_path: Path, rank: int, model_parallel: int) -> Path:
    """The file rank `rank` loads: the checkpoint itself, or rank_N/<one>.ckpt of a directory of shards."""
    if model_parallel == 1:
        return ckpt_path
    files = sorted((ckpt_path / f"rank_{rank}").glob("*.ckpt")) if (ckpt_path / f"rank_{rank}").is_dir() else []
    if len(files) != 1:
        raise UserError(f"{ckpt_path / f'rank_{rank}'} holds {len(files)} .ckpt files; a shard directory holds "
                        "exactly one per rank", hint="slice the checkpoint with `qwenbuild transform_ckpt`")
    return files[0]


def _graph_facts(scratch: Path, dirs: GraphDirs, kind: str, rank: int) -> dict:
    """mindir, variables and digest entries of the sidecar, from the freshly written scratch copy."""
    graph = scratch / dirs.graph_file(kind, rank).name
    variables = dirs.variables_dir(kind, rank).name
    return {"mindir": graph.name, "variables": variables if (scratch / variables).exists() else None,
            "digest": mindir_digest(graph)}


def _summary(scratch: Path, dirs: GraphDirs, kind: str, rank: int, doc: dict) -> dict:
    size = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
    return {"mindir": str(dirs.graph_file(kind, rank)),
            "sidecar": str(dirs.sidecar_file(kind, rank)),
            "variables": str(dirs.variables_dir(kind, rank)) if doc["variables"] else None,
            "digest": doc["mindir_digest"], "bytes": size}


def _special_ids(cfg: QwenConfig, tokenizer_dir) -> tuple[list[int], int | None]:
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        if len(tokenizer) > cfg.vocab_size:
            raise UserError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                            f"vocab_size {cfg.vocab_size}", hint="use the tokenizer the model was trained with")
        return stop_ids(tokenizer), pad_id(tokenizer)
    if cfg.vocab_size > max(QWEN_SPECIAL_IDS.values()):
        return [QWEN_SPECIAL_IDS[IM_END], QWEN_SPECIAL_IDS[ENDOFTEXT]], QWEN_SPECIAL_IDS[ENDOFTEXT]
    return [], None

