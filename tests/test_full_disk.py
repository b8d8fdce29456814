"""A full disk (a file-size limit, or a small tmpfs where mounting works) ends each writer with a clear message,
a non-zero exit and no half artifact at the final path; once there is room again the same command completes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISK_FULL = re.compile(r"no space left|File too large|file-size limit|No free disk|No space left")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A ~0.9 MB Hugging Face model, alpaca rows, their ChatML conversations and a tokenizer trained on them."""
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.random_init import write_random_hf_model

    src = tmp_path_factory.mktemp("inputs")
    cfg = QwenConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=128)
    write_random_hf_model(cfg, 0, src / "hf")
    rows = [{"instruction": f"Repeat the word {w} {i} times", "input": "", "output": f"{w} " * (i % 5 + 1)}
            for i, w in enumerate(["alpha", "beta", "gamma", "delta", "一二三"] * 40)]
    (src / "alpaca.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for argv in (["alpaca_converter", "--data_path", "alpaca.json", "--output_path", "chat.jsonl"],
                 ["tokenizer", "--output_dir", "tok", "--train_from", "alpaca.json", "--vocab_size", "300"],
                 ["convert_weight", "--torch_ckpt_dir", "hf", "--mindspore_ckpt_path", "model.ckpt"],
                 ["strategy", "--model_dir", "hf", "--data_parallel", "2", "--output_dir", "strategy"]):
        subprocess.run([sys.executable, "-m", "qwenbuild", *argv], cwd=src, check=True, capture_output=True)
    return src


def _fsize_limit(limit: int):
    def apply():
        # without SIG_IGN the kernel kills the writer with SIGXFSZ instead of failing the write with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run(argv: list[str], cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=_fsize_limit(limit) if limit else None)


def _qwenbuild(*args) -> list[str]:
    return [sys.executable, "-m", "qwenbuild", *map(str, args)]


def _cannot(reason: str):
    # CI runs as root with mount allowed: there a full disk that cannot be made is a failure, not a skip
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the small-tmpfs tests: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at path; the test is skipped where mounting is not allowed (fails under CI=true)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        _cannot("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        _cannot(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*") if re.search(r"\.(tmp|old|export)-\d+-|^\.mindrecord-", p.name))


# (name, argv with {i} = inputs and {o} = output dir, the final artifact, a file-size limit that cannot hold it)
WRITERS = [
    ("convert_weight", ["convert_weight", "--torch_ckpt_dir", "{i}/hf", "--mindspore_ckpt_path", "{o}/model.ckpt"],
     "model.ckpt", 100_000),
    ("tokenizer", ["tokenizer", "--output_dir", "{o}/tok", "--train_from", "{i}/alpaca.json", "--vocab_size", "300"],
     "tok", 2_000),
    ("preprocess", ["preprocess", "--input_glob", "{i}/chat.jsonl", "--vocab_file", "{i}/tok/vocab.json",
                    "--merges_file", "{i}/tok/merges.txt", "--seq_length", "64", "--workers", "0",
                    "--output_file", "{o}/data.mindrecord"], "data.mindrecord", 20_000),
    ("alpaca_converter", ["alpaca_converter", "--data_path", "{i}/alpaca.json", "--output_path", "{o}/chat.jsonl"],
     "chat.jsonl", 4_000),
    ("transform_ckpt", ["transform_ckpt", "--src_ckpt_dir", "{i}/model.ckpt", "--dst_ckpt_strategy", "{i}/strategy",
                        "--dst_ckpt_dir", "{o}/sharded"], "sharded/rank_0", 100_000),
    ("export", ["export", "--load_checkpoint", "{i}/model.ckpt", "--torch_ckpt_dir", "{i}/hf", "--seq_length", "8",
                "--output_dir", "{o}/graphs"], "graphs/mindir_full_checkpoint/rank_0_graph.mindir", 100_000),
]
ON_TMPFS = [w for w in WRITERS if w[0] not in ("transform_ckpt", "export")]  # each is covered by the limit above


def _argv(template: list[str], inputs: Path, out: Path) -> list[str]:
    return _qwenbuild(*[a.replace("{i}", str(inputs)).replace("{o}", str(out)) for a in template])


def _assert_clean_failure(proc, out: Path, artifact: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert DISK_FULL.search(proc.stderr), proc.stderr
    assert not (out / artifact).exists(), "a half artifact was left at the final path"
    assert not (out / (artifact + ".db")).exists()
    assert _leftovers(out) == []


@pytest.mark.parametrize("name, template, artifact, limit",
                         [pytest.param(*w, id=w[0], marks=[pytest.mark.slow] if w[0] == "export" else []) for w in WRITERS])
def test_file_size_limit(inputs, tmp_path, name, template, artifact, limit):
    out = tmp_path / "out"
    out.mkdir()
    argv = _argv(template, inputs, out)
    _assert_clean_failure(_run(argv, tmp_path, limit), out, artifact)
    again = _run(argv, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / artifact).exists()
    assert _leftovers(out) == []


@pytest.mark.parametrize("name, template, artifact, limit", ON_TMPFS, ids=[w[0] for w in ON_TMPFS])
def test_small_tmpfs(inputs, tmp_path, name, template, artifact, limit):
    with small_disk(tmp_path / "disk", "4k") as out:
        argv = _argv(template, inputs, out)
        _assert_clean_failure(_run(argv, tmp_path), out, artifact)
        _grow(out, "64m")  # MindRecord refuses to start with less than a few MB free
        again = _run(argv, tmp_path)
        assert again.returncode == 0, again.stderr
        assert (out / artifact).exists()
        assert _leftovers(out) == []


def _small_manifest(tmp_path: Path, build_dir: Path) -> Path:
    text = (REPO / "qwen.toml").read_text(encoding="utf-8")
    for pattern, new in ((r"^num_train = \d+", "num_train = 300"), (r"^num_heldout = \d+", "num_heldout = 20"),
                         (r'^dir = ".*"', f'dir = "{build_dir}"')):
        text, n = re.subn(pattern, new, text, count=1, flags=re.M)
        assert n == 1, pattern
    path = tmp_path / "qwen.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _doit(manifest: Path, cwd: Path, limit: int | None = None):
    return _run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), f"manifest={manifest}", "mindrecord"],
                cwd, limit)


def _assert_no_mindrecord(build: Path, proc) -> None:
    from qwenbuild.lock import Lock

    assert proc.returncode != 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert "qwenbuild mindrecord: error:" in output and DISK_FULL.search(output), output
    assert not (build / "data" / "mindrecord").exists()
    assert _leftovers(build / "data") == []
    assert Lock(build / "qwen.lock").entry("mindrecord") is None
    assert (build / "tokenizer" / "vocab.json").is_file()  # the tasks before it were built and kept


def _assert_resumed(build: Path, proc) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-- tokenizer" in proc.stdout, proc.stdout  # up to date: only the failed task runs again
    assert (build / "data" / "mindrecord" / "alpaca-messages.mindrecord").is_file()
    assert _leftovers(build) == []


@pytest.mark.slow
def test_doit_mindrecord_with_a_file_size_limit(tmp_path):
    build = tmp_path / "build"
    manifest = _small_manifest(tmp_path, build)
    _assert_no_mindrecord(build, _doit(manifest, tmp_path, limit=150_000))
    _assert_resumed(build, _doit(manifest, tmp_path))


@pytest.mark.slow
def test_doit_mindrecord_on_a_small_tmpfs(tmp_path):
    with small_disk(tmp_path / "build", "256k") as build:
        manifest = _small_manifest(tmp_path, build)
        _assert_no_mindrecord(build, _doit(manifest, tmp_path))
        _grow(build, "64m")
        _assert_resumed(build, _doit(manifest, tmp_path))
