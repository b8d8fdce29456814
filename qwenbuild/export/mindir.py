"""Export the prefill (full) and decode (inc) MINDIR graphs of one rank, under the original MindFormers file names."""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from qwenbuild.processes import run_child
from qwenbuild.store import atomic_path, promote, remove
from qwenbuild.tokenizer import load_tokenizer, pad_id, stop_ids
from qwenbuild.tokenizer.files import ENDOFTEXT, IM_END, QWEN_SPECIAL_IDS

MAX_BATCH_SIZE = 4096  # the graphs' inputs and KV cache are allocated for the whole batch at export time


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_args(cfg: QwenConfig, ckpt_path: Path, rank: int, batch_size: int, seq_length: int) -> None:
    if not ckpt_path.is_file():
        raise UserError(f"checkpoint {ckpt_path} does not exist",
                        hint="convert one with `qwenbuild convert_weight` or point at a rank's shard")
    if not isinstance(rank, int) or rank < 0:
        raise UserError(f"rank must be a non-negative integer, not {rank!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"batch_size must lie in 1..{MAX_BATCH_SIZE}, not {batch_size!r}")
    if not isinstance(seq_length, int) or not 2 <= seq_length <= cfg.max_position_embeddings:
        raise UserError(f"seq_length {seq_length!r} must lie in 2..{cfg.max_position_embeddings} "
                        f"(max_position_embeddings of the model)")


def _run_worker(spec: dict) -> dict:
    """Run qwenbuild.export.worker in a fresh interpreter (its working directory a temporary one)."""
    with tempfile.TemporaryDirectory(prefix="qwenbuild-export-") as work:
        work = Path(work)
        spec = dict(spec, result_file=str(work / "result.json"), error_file=str(work / "error.txt"))
        (work / "spec.json").write_text(json.dumps(spec))
        proc = run_child([sys.executable, "-m", "qwenbuild.export.worker", str(work / "spec.json")],
                         cwd=work, stdin=subprocess.DEVNULL)
        if proc.returncode == 2 and (work / "error.txt").exists():
            raise UserError((work / "error.txt").read_text())
        if proc.returncode != 0 or not (work / "result.json").exists():
            raise UserError(f"MindSpore failed to export rank {spec['rank']} (exit code {proc.returncode}); "
                            f"nothing was changed under {spec['out_root']}", hint="see the MindSpore messages above")
        return json.loads((work / "result.json").read_text())


def _promote_rank(dirs: GraphDirs, rank: int, scratch: dict[str, Path], docs: dict[str, dict]) -> None:
    # the sidecar marks completeness: drop the old ones first and write the new ones last
    for kind in KINDS:
        remove(dirs.sidecar_file(kind, rank))
    for kind in KINDS:
        new_vars = scratch[kind] / dirs.variables_dir(kind, rank).name
        final_vars = dirs.variables_dir(kind, rank)
        if new_vars.exists():
            promote(new_vars, final_vars)
        else:
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
                  progress=_stderr) -> dict:
    """Write out_root/mindir_{full,inc}_checkpoint/rank_N_graph.{mindir,json} (+ rank_N_variables/).

    out_root: the export root, or GraphDirs naming the full and inc directories themselves.
    ckpt_path: a complete MindSpore checkpoint, or the shard of `rank` when it holds whole tensors (mp=1).
    An mp>1 shard holds tensor slices; MindSpore compiles sliced graphs only under semi_auto_parallel on
    Ascend/GPU, so on CPU such a shard is refused and the complete checkpoint exports the whole model per rank.
    tokenizer_dir: where the sidecar's eos/pad ids come from; without it the Qwen1.5 ids are recorded when the
    vocabulary holds them.
    external_weights: write weights to rank_N_variables/ even below MindSpore's 1 GiB threshold (as the
    original's large models are written). Returns {"full"|"inc": {"mindir", "sidecar", "variables", "digest"}}.
    """
    ckpt_path = Path(ckpt_path)
    dirs = out_root if isinstance(out_root, GraphDirs) else GraphDirs.under(out_root)
    _check_args(cfg, ckpt_path, rank, batch_size, seq_length)
    for directory in (dirs.full.parent, dirs.full, dirs.inc):
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{directory} is a file, but the graphs go into a directory there",
                            hint="remove it or choose another --output_dir")
    eos_token_ids, pad_token_id = _special_ids(cfg, tokenizer_dir)
    t0 = time.perf_counter()
    tag = f".rank_{rank}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch = {kind: dirs.dir(kind) / tag for kind in KINDS}
    made_here = _missing_dirs(dirs.dir(kind) for kind in KINDS)
    try:
        for path in scratch.values():
            path.mkdir(parents=True)
        spec = {"cfg": dataclasses.asdict(cfg), "ckpt_path": str(ckpt_path.resolve()), "rank": rank,
                "out_root": str(dirs.full.parent), "batch_size": batch_size, "seq_length": seq_length,
                "graph_name": dirs.graph_file(FULL, rank).name,
                "scratch": {k: str(p.resolve()) for k, p in scratch.items()},
                "external_weights": bool(external_weights), "verbose": progress is not None}
        version = _run_worker(spec)["mindspore_version"]
        docs = {kind: sidecar(kind, cfg, rank=rank, batch_size=batch_size, seq_length=seq_length,
                              eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                              source_checkpoint=ckpt_path.name, mindspore_version=version,
                              **_graph_facts(scratch[kind], dirs, kind, rank))
                for kind in KINDS}
        summary = {kind: _summary(scratch[kind], dirs, kind, rank, docs[kind]) for kind in KINDS}
        _promote_rank(dirs, rank, scratch, docs)
    finally:
        for path in scratch.values():
            remove(path)
        for directory in made_here:  # a failed first export leaves no empty graph directories behind
            with contextlib.suppress(OSError):
                directory.rmdir()
    if progress:
        progress(f"export rank {rank}: full {summary['full']['bytes'] / 1e6:.1f} MB + inc "
                 f"{summary['inc']['bytes'] / 1e6:.1f} MB, batch {batch_size} x seq {seq_length}, "
                 f"{'external weights, ' if summary['full']['variables'] else ''}"
                 f"{time.perf_counter() - t0:.1f} s -> {dirs.full.parent}")
    return summary


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

