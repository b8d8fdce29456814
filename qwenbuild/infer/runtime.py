"""The generation loop over the exported graphs: prefill once, then one decode call per new token."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.export.graph_files import FULL, INC, KINDS, GraphDirs
from qwenbuild.export.sidecar import read_sidecar
from qwenbuild.infer.backends import open_backend
from qwenbuild.infer.prompt import encode
from qwenbuild.infer.sampling import Sampling, TokenChooser
from qwenbuild.parallel.launch_scripts import local_msrun
from qwenbuild.processes import run_child
from qwenbuild.tokenizer import load_tokenizer, pad_id, stop_ids


@dataclasses.dataclass
class ExportInfo:
    root: Path
    rank: int
    full: dict
    inc: dict

    @property
    def batch_size(self) -> int:
        return self.full["batch_size"]

    @property
    def seq_length(self) -> int:
        return self.full["seq_length"]

    @property
    def vocab_size(self) -> int:
        return self.full["vocab_size"]

    @property
    def model_parallel(self) -> int:
        """Ranks whose graphs run together (each holds its slice of the model)."""
        return self.full.get("model_parallel", 1)

    def graph_path(self, kind: str) -> Path:
        return GraphDirs.under(self.root).graph_file(kind, self.rank)


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    texts: list[str]
    seconds: float
    prefill_seconds: float
    backend: str

    @property
    def new_tokens(self) -> int:
        return sum(len(g) for g in self.generated_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens from decode calls only (the first token of each row comes from prefill)."""
        decoded = self.new_tokens - sum(1 for g in self.generated_ids if g)
        spent = self.seconds - self.prefill_seconds
        return decoded / spent if spent > 0 else 0.0

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids, "text": self.texts,
                "new_tokens": self.new_tokens, "seconds": round(self.seconds, 6),
                "prefill_seconds": round(self.prefill_seconds, 6),
                "tokens_per_s": round(self.tokens_per_s, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3), "backend": self.backend}


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: the export under {path.parent.parent} is incomplete",
                        hint="run the export again (doit export / qwenbuild export)")


def open_export(mindir_root_dir, rank: int = 0, batch_size: int | None = None,
                seq_length: int | None = None) -> ExportInfo:
    """Read both sidecars of a rank, check the graph files and that batch/seq_length match the export."""
    root = Path(mindir_root_dir)
    if not root.is_dir():
        raise UserError(f"--mindir_root_dir {root} is not a directory",
                        hint="point at the export's output root, which holds mindir_full_checkpoint/")
    dirs = GraphDirs.under(root)
    docs = {kind: read_sidecar(dirs.sidecar_file(kind, rank)) for kind in KINDS}
    for kind, doc in docs.items():
        _check_file(dirs.graph_file(kind, rank), f"{kind} graph")
        if doc.get("variables"):
            _check_file(dirs.dir(kind) / doc["variables"], "external weights")
    for key in ("batch_size", "seq_length", "vocab_size"):
        if docs["full"][key] != docs["inc"][key]:
            raise UserError(f"{dirs.sidecar_file(FULL, rank)} and the inc sidecar disagree on {key} "
                            f"({docs['full'][key]} vs {docs['inc'][key]})", hint="re-export both graphs together")
    info = ExportInfo(root, rank, docs["full"], docs["inc"])
    for flag, asked, exported in (("--batch_size", batch_size, info.batch_size),
                                  ("--seq_length", seq_length, info.seq_length)):
        if asked is not None and asked != exported:
            raise UserError(f"{flag} {asked} does not match the export: {dirs.sidecar_file(FULL, rank)} "
                            f"says {flag[2:]} = {exported}",
                            hint=f"use {flag} {exported}, or re-export with {flag[2:]} = {asked}")
    return info


def _check_prompts(info: ExportInfo, prompt_ids: list[list[int]]) -> None:
    if not prompt_ids:
        raise UserError("no prompt given")
    if len(prompt_ids) > info.batch_size:
        raise UserError(f"{len(prompt_ids)} prompts do not fit the exported batch_size {info.batch_size}",
                        hint="give at most batch_size prompts, or re-export with a larger batch_size")
    for row, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {row} is empty after tokenization")
        if len(ids) >= info.seq_length:
            raise UserError(f"prompt {row} is {len(ids)} tokens long; the graphs were exported with seq_length "
                            f"{info.seq_length}, which leaves room for at most {info.seq_length - 1} prompt tokens",
                            hint="shorten the prompt, or re-export with a larger seq_length")
        bad = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad:
            raise UserError(f"prompt {row} holds token id {bad[0]}, outside the model's vocabulary "
                            f"(0..{info.vocab_size - 1})", hint="use the tokenizer the model was trained with")


def generate_ids(backend, info: ExportInfo, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids,
                 sampling: Sampling = Sampling(), pad_token_id: int | None = None):
    """New token ids per prompt (each ending with an eos id if one came) and (seconds, prefill_seconds).

    Rows beyond the given prompts repeat the first one and are dropped; a finished row stops advancing, so its
    cache slot is rewritten in place and never grows past seq_length.
    """
    _check_prompts(info, prompt_ids)
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, not {max_new_tokens}")
    b, s = info.batch_size, info.seq_length
    pad = info.full.get("pad_token_id") if pad_token_id is None else pad_token_id
    pad = pad if pad is not None and 0 <= pad < info.vocab_size else 0  # padded slots are masked: any id works
    rows = list(prompt_ids) + [prompt_ids[0]] * (b - len(prompt_ids))
    ids = np.full((b, s), pad, dtype=np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    valid = np.array([len(row) for row in rows], dtype=np.int32)
    budget = [min(max_new_tokens, s - len(row)) for row in rows]
    eos = {int(e) for e in eos_ids}
    chooser = TokenChooser(sampling)
    history = [list(row) for row in rows]
    new = [[] for _ in rows]
    # each row its own cache row; attention reads every slot of seq_length (masked after each row's length)
    batch_index, zactivate_len = np.arange(b, dtype=np.int64), np.zeros((s,), np.int64)
    t0 = time.perf_counter()
    logits = backend.prefill(ids, valid, batch_index, zactivate_len)
    prefill_seconds = time.perf_counter() - t0
    while True:
        done = True
        for r in range(b):
            if len(new[r]) < budget[r] and (not new[r] or new[r][-1] not in eos):
                token = chooser.choose(logits[r], history[r])
                new[r].append(token)
                history[r].append(token)
            finished = len(new[r]) >= budget[r] or new[r][-1] in eos
            done = done and finished
        if done:
            break
        last = np.array([[row[-1]] for row in new], dtype=np.int32)
        active = np.array([len(n) < budget[r] and n[-1] not in eos for r, n in enumerate(new)])
        valid = valid + active.astype(np.int32)
        logits = backend.decode(last, valid, batch_index, zactivate_len)
    return new[:len(prompt_ids)], (time.perf_counter() - t0, prefill_seconds)


def warm_up(backend, info: ExportInfo) -> float:
    """One prefill and one decode call on padding, so compile time stays out of tokens/s (the original warms
    up with a short prompt too); returns the seconds spent."""
    t0 = time.perf_counter()
    b, s = info.batch_size, info.seq_length
    extra = (np.arange(b, dtype=np.int64), np.zeros((s,), np.int64))
    backend.prefill(np.zeros((b, s), np.int32), np.ones((b,), np.int32), *extra)
    backend.decode(np.zeros((b, 1), np.int32), np.full((b,), 2, np.int32), *extra)
    return time.perf_counter() - t0


def generate(mindir_root_dir, tokenizer, prompts, *, max_new_tokens: int = 512, max_length: int | None = None,
             do_sample: bool = False, top_k: int = 3, top_p: float = 0.85, temperature: float = 1.0,
             repetition_penalty: float = 1.0, seed: int = 0, raw: bool = False, backend: str = "auto",
             ge_config_path=None, batch_size: int | None = None, seq_length: int | None = None, rank: int = 0,
             device_id: int = 0, progress=None) -> GenerationResult:
    """Tokenize (ChatML unless raw), run the exported graphs of `rank`, decode the replies.

    tokenizer: a directory with vocab.json, merges.txt and tokenizer_config.json, or a loaded tokenizer.
    max_length: prompt and answer together stop there (the original script's --predict_length).
    """
    sampling = checked_sampling(max_new_tokens, do_sample, top_k, top_p, temperature, repetition_penalty, seed)
    info = open_export(mindir_root_dir, rank, batch_size, seq_length)
    where = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else "the given files"
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if len(tokenizer) > info.vocab_size:
        raise UserError(f"the tokenizer in {where} has {len(tokenizer)} tokens, the exported model only "
                        f"{info.vocab_size}", hint="use the tokenizer the model was trained with")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompt_ids = [encode(tokenizer, p, raw) for p in prompts]
    _check_prompts(info, prompt_ids)
    if max_length is not None:
        longest = max(len(p) for p in prompt_ids)
        if max_length <= longest:
            raise UserError(f"--predict_length {max_length} leaves no room for an answer after a prompt of "
                            f"{longest} tokens", hint="it counts the prompt and the answer together")
        max_new_tokens = min(max_new_tokens, max_length - longest)
    runner = open_backend(backend, info.graph_path(FULL), info.graph_path(INC),
                          ge_config_path=ge_config_path, device_id=device_id, rank_id=rank)
    warm_up(runner, info)
    generated, (seconds, prefill_seconds) = generate_ids(runner, info, prompt_ids, max_new_tokens,
                                                         stop_ids(tokenizer), sampling, pad_id(tokenizer))
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    result = GenerationResult(prompt_ids, generated, texts, seconds, prefill_seconds, runner.name)
    if progress:
        progress(f"infer: {result.new_tokens} tokens in {seconds:.2f} s = {result.tokens_per_s:.1f} tokens/s "
                 f"(prefill {prefill_seconds * 1000:.0f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s, "
                 f"{runner.name})")
    return result


def checked_sampling(max_new_tokens: int = 512, do_sample: bool = False, top_k: int = 3, top_p: float = 0.85,
                     temperature: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0) -> Sampling:
    """The sampling settings, refused with the flag's name before anything is loaded."""
    sampling = Sampling(do_sample, top_k, top_p, temperature, repetition_penalty, seed)
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, not {max_new_tokens}")
    return sampling


def generate_on_ranks(mindir_root_dir, tokenizer, prompts, *, progress=None, **options) -> GenerationResult:
    """generate() on an export of any model_parallel: one rank here, or every rank under msrun on this machine
    (rank 0's result). tokenizer: a directory; options: generate()'s keywords."""
    checked_sampling(**{k: options[k] for k in ("max_new_tokens", "do_sample", "top_k", "top_p", "temperature",
                                                 "repetition_penalty", "seed") if k in options})
    info = open_export(mindir_root_dir, 0, options.get("batch_size"), options.get("seq_length"))
    if info.model_parallel == 1:
        return generate(mindir_root_dir, tokenizer, prompts, progress=progress, **options)
    if options.get("backend", "auto") == "lite":
        raise UserError("the lite backend runs one rank per process on Ascend",
                        hint="start run_qwen1_5_mslite_infer-style processes per rank there; here use graphcell")
    options = {k: v for k, v in options.items() if k not in ("rank", "device_id", "ge_config_path")}
    with tempfile.TemporaryDirectory(prefix="qwenbuild-infer-") as work:
        work = Path(work)
        spec = {"mindir_root_dir": str(Path(mindir_root_dir).resolve()), "tokenizer": str(Path(tokenizer).resolve()),
                "prompts": [prompts] if isinstance(prompts, str) else list(prompts), "options": options,
                "result_file": str(work / "result.json"), "error_file": str(work / "error.txt")}
        (work / "spec.json").write_text(json.dumps(spec, ensure_ascii=False))
        if progress:
            progress(f"infer: {info.model_parallel} tensor-parallel ranks under msrun")
        # the worker script beside this module (msrun starts a script file, which imports this module)
        script = Path(__file__).resolve().with_name("worker.py")
        argv = local_msrun(info.model_parallel, work / "logs", [str(script), str(work / "spec.json")],
                           Path(sys.executable).parent)
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        proc = run_child(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        if (work / "error.txt").exists():
            raise UserError((work / "error.txt").read_text())
        if proc.returncode != 0 or not (work / "result.json").exists():
            logs = sorted((work / "logs").glob("worker_*.log")) if (work / "logs").is_dir() else []
            tail = "\n".join(logs[0].read_text(errors="replace").splitlines()[-15:]) if logs else ""
            raise UserError(f"inference across {info.model_parallel} ranks failed (msrun exit code "
                            f"{proc.returncode})" + (f"\n{tail}" if tail else ""))
        doc = json.loads((work / "result.json").read_text())
    result = GenerationResult(doc["prompt_ids"], doc["generated_ids"], doc["text"], doc["seconds"],
                              doc["prefill_seconds"], doc["backend"])
    if progress:
        progress(f"infer: {result.new_tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_s:.1f} tokens/s "
                 f"across {info.model_parallel} ranks")
    return result


def join_ranks() -> int:
    """This process's rank among the msrun workers of a tensor-parallel export, once it has joined them."""
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms
    from mindspore.communication import get_rank, init

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    return get_rank()


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
