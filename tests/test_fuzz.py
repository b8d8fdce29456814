"""Generated bad input and interrupts: manifests, alpaca rows, checkpoint and safetensors bytes and prompts made by
hypothesis, and SIGINT/SIGTERM sent at a random moment of every subcommand. Each case must end in a clean exit
(0, or non-zero with the file or key named), never a traceback, and leave the user's files whole and nothing
half-written beside them.

The default run is bounded (a few minutes); QWENBUILD_FUZZ_SCALE=N runs N times the cases. The cases run and the
signals sent are printed at the end of the test session."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qwenbuild import cli
from qwenbuild.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
SCALE = max(1, int(os.environ.get("QWENBUILD_FUZZ_SCALE", "1")))
SENTINEL = b"the user's earlier output\n"
TALLY: collections.Counter = collections.Counter()
TEMPORARY = re.compile(r"\.(tmp|old|export)-|\.qwen-[0-9a-f]+\.")


def fuzz(examples: int, shrink: bool = True):
    """hypothesis settings of one property: derandomized (CI sees the same cases), no per-example deadline;
    without shrinking where each case takes seconds (the failing case is still reported)."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), phases=phases)


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """qwenbuild's own entry point in this process: an exception escaping it fails the test with its traceback."""
    err, out = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:  # argparse refusing a flag
                rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(old)
    TALLY["cases"] += 1
    return rc, err.getvalue()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if TEMPORARY.search(p.name))


def check_outcome(rc: int, err: str, named: list[str], cwd: Path, kept: dict[Path, bytes]) -> None:
    """A refusal names one of `named`; the user's files in `kept` are byte for byte as before; no temporaries."""
    assert "Traceback" not in err, err
    if rc != 0:
        assert any(n in err for n in named), f"exit {rc} without naming any of {named}:\n{err}"
        for path, data in kept.items():
            assert path.read_bytes() == data, f"{path} was changed by a failed run"
    assert not leftovers(cwd), leftovers(cwd)


# ---------------------------------------------------------------- manifests

BASE_TOML = (REPO / "qwen.toml").read_text(encoding="utf-8")
KEY_LINES = [i for i, line in enumerate(BASE_TOML.splitlines()) if re.match(r"^\w+ = ", line)]

toml_values = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "2.0", "0.0", "-0.5", "1e308", "true", "false", "[]", "{}",
                     "1979-05-27", "[1, \"a\"]", "{a = 1}", "\"\"", "''"]),
    st.floats(allow_nan=False).map(repr).filter(lambda s: "e" not in s or "." in s),
    st.text(max_size=12).map(json.dumps),
)


@st.composite
def manifests(draw) -> str:
    lines = BASE_TOML.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["same type", "same type", "same type", "value", "value", "duplicate", "delete",
                                     "insert", "header"]))
        if kind == "same type":  # mostly plausible edits: some plans valid, some not
            i = draw(st.sampled_from(KEY_LINES))
            key, _, old = lines[i].partition(" = ")
            old = old.split("#")[0].strip()
            if old in ("true", "false"):
                new = draw(st.sampled_from(["true", "false"]))
            elif re.fullmatch(r"-?\d+", old):
                new = str(draw(st.integers(0, 2 * abs(int(old)) + 4)))
            elif re.fullmatch(r"-?[\d.e-]+", old):
                new = repr(draw(st.floats(0, 2 * abs(float(old)) + 1)))
            else:
                new = old
            lines[i] = f"{key} = {new}"
        elif kind == "value":
            i = draw(st.sampled_from(KEY_LINES))
            key = lines[i].split(" = ")[0] if " = " in lines[i] else "x"
            lines[i] = f"{key} = {draw(toml_values)}"
        elif kind == "duplicate":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i + 1, lines[i])
        elif kind == "delete" and len(lines) > 1:
            del lines[draw(st.integers(0, len(lines) - 1))]
        elif kind == "insert":
            lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)).replace("\r", ""))
        else:
            headers = [i for i, line in enumerate(lines) if line.startswith("[")]
            if headers:
                lines[draw(st.sampled_from(headers))] = f"[{draw(st.text(max_size=8))}]"
    return "\n".join(lines) + "\n"


@fuzz(40)
@given(text=manifests())
def test_generated_manifests_validate_plan_and_set_cleanly(text):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "qwen.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        before = path.read_bytes()
        rc, err = run_cli(["validate", "-c", str(path)], tmp)
        check_outcome(rc, err, [str(path), "qwen.toml"], tmp, {path: before})
        assert rc in (0, 2), err
        rc_plan, err = run_cli(["plan", "-c", str(path), "--no-status"], tmp)
        check_outcome(rc_plan, err, [str(path), "qwen.toml"], tmp, {path: before})
        assert (rc_plan == 0) == (rc == 0), f"validate said {rc}, plan {rc_plan}:\n{err}"
        TALLY["manifests valid" if rc == 0 else "manifests refused"] += 1
        rc, err = run_cli(["set", "-c", str(path), "train.steps=7"], tmp)
        check_outcome(rc, err, [str(path), "qwen.toml", "train.steps"], tmp, {path: before})


@fuzz(25)
@given(key=st.sampled_from(["train.learning_rate", "parallel.data_parallel", "dataset.seq_length", "hardware.nodes[0].ip",
                            "hardware.nodes[3].ip", "export.batch_size", "model.preset", "nope.key", "train",
                            "hardware.nodes[+].ip", "hardware.nodes[-1].host"]),
       value=toml_values)
def test_generated_set_edits_keep_the_manifest_valid_or_untouched(key, value):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "qwen.toml"
        path.write_text(BASE_TOML, encoding="utf-8")
        before = path.read_bytes()
        rc, err = run_cli(["set", "-c", str(path), f"{key}={value}"], tmp)
        check_outcome(rc, err, [str(path), "qwen.toml", key.split("[")[0]], tmp, {path: before})
        if rc == 0:  # an edit that was accepted leaves a manifest that validates
            rc, err = run_cli(["validate", "-c", str(path)], tmp)
            assert rc == 0, err


# the tiny preset's [out, in] of each LoRA target, written out here rather than taken from qwenbuild
TINY_TARGETS = {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128),
                "gate_proj": (352, 128), "up_proj": (352, 128), "down_proj": (128, 352)}
target_names = st.sampled_from(list(TINY_TARGETS) + ["qkv_proj", "", "Q_PROJ", "lm_head", "w1"])


def mostly(plausible, edge):
    """`plausible` four times in six, else a value near the bounds or any TOML value."""
    return st.sampled_from([plausible] * 4 + [edge, toml_values]).flatmap(lambda chosen: chosen)


@fuzz(25)
@given(rank=mostly(st.integers(1, 140).map(str), st.integers(-1, 400).map(str)),
       alpha=mostly(st.floats(0.01, 64).map(repr), st.floats(-1, 1).map(repr)),
       dropout=mostly(st.floats(0, 0.99).map(repr), st.floats(-0.5, 1.5).map(repr)),
       targets=mostly(st.lists(st.sampled_from(list(TINY_TARGETS)), min_size=1, max_size=4, unique=True)
                      .map(json.dumps), st.lists(target_names, max_size=4).map(json.dumps)))
def test_generated_lora_settings_are_accepted_only_when_they_fit(rank, alpha, dropout, targets):
    """A LoRA setting is refused by `set` naming its key, or accepted only when every adapter fits its target."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "qwen.toml"
        path.write_text(BASE_TOML, encoding="utf-8")
        before = path.read_bytes()
        rc, err = run_cli(["set", "-c", str(path), 'train.method="lora"', f"train.lora.rank={rank}",
                           f"train.lora.alpha={alpha}", f"train.lora.dropout={dropout}",
                           f"train.lora.targets={targets}"], tmp)
        check_outcome(rc, err, ["train.lora."], tmp, {path: before})
        if rc:
            TALLY["lora settings refused"] += 1
            return
        lora = load_manifest(path).train.lora_config
        assert lora.targets and len(set(lora.targets)) == len(lora.targets) and set(lora.targets) <= set(TINY_TARGETS)
        assert all(1 <= lora.rank < min(TINY_TARGETS[t]) for t in lora.targets), lora
        assert lora.alpha > 0 and 0 <= lora.dropout < 1, lora
        TALLY["lora settings accepted"] += 1


# ---------------------------------------------------------------- manifest strings in generated scripts

SENTINEL_FILE = Path(tempfile.gettempdir()) / f"qwenbuild-fuzz-ran-{os.getpid()}"
SCRIPT_KEYS = ["hardware.nodes[0].host", "hardware.nodes[1].host", "hardware.nodes[1].ip", "hardware.python",
               "hardware.env_script", "build.dir", "export.predict_data"]
_RUN = f"touch {SENTINEL_FILE}"
script_strings = st.one_of(
    st.sampled_from([f"x\n{_RUN}", f"x\r{_RUN}", f"$({_RUN})", f"`{_RUN}`", f"a;{_RUN}", f"a' ; {_RUN}; '",
                     f'a" ; {_RUN} #', f"a && {_RUN}", f"a | {_RUN}", f"${{IFS}}{_RUN}", f"/tmp/$({_RUN})/python3",
                     f"/a b/'$({_RUN})'/python3", f"/x/{_RUN}.sh", f"1.2.3.4; {_RUN}", "10.0.0.300", "-x", "--help",
                     "*", "~root", "a\\", "\x1b[2Jx", "a\u2028b", "a\u0085b", "node-1", "n.example.org", "python",
                     "/opt/env/bin/python3", "build dir", "${HOME}", "\"quoted\"", "'single'", "-", "", " "]),
    st.lists(st.sampled_from(list("ab1-./ $`'\";|&()<>*?~\\{}!#=") + [_RUN]), max_size=12).map("".join),
)


@st.composite
def script_settings(draw) -> tuple[str, str]:
    """A key that reaches a generated script and a string for it, often in the form the key accepts (an absolute
    path, a path ending in /python3) so that the string gets into the scripts."""
    key = draw(st.sampled_from(SCRIPT_KEYS))
    value = draw(script_strings)
    form = draw(st.sampled_from(["as is", "shaped", "shaped"]))
    if form == "shaped" and key == "hardware.env_script":
        value = "/" + value
    elif form == "shaped" and key == "hardware.python":
        value = f"/{value}/python3"
    return key, value


def _stub_bin(directory: Path, log: Path) -> Path:
    """python3 / python that record their argv (one JSON list a line), and srun that runs its command here."""
    directory.mkdir()
    record = f'#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, "a").write(json.dumps(sys.argv) + "\\n")\n'
    for name in ("python3", "python"):
        (directory / name).write_text(record.replace("sys.argv", f"[{name!r}] + sys.argv[1:]"))
    (directory / "srun").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # drops --ntasks-per-node, --kill-on-bad-exit
    for path in directory.iterdir():
        path.chmod(0o755)
    return directory


def _run_script(text: str, tmp: Path, bin_dir: Path, node_name: str | None = None) -> subprocess.CompletedProcess:
    script = tmp / "script.sh"
    script.write_text(text, encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, text
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), **({"SLURMD_NODENAME": node_name}
                                                                   if node_name is not None else {})}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp, timeout=60)


@pytest.fixture(scope="module")
def script_manifest():
    return BASE_TOML.replace("devices_per_node = 2", "devices_per_node = 1").replace(
        '[[hardware.nodes]]\nhost = "localhost"\nip = "127.0.0.1"\n',
        '[[hardware.nodes]]\nhost = "node0"\nip = "10.213.0.1"\n\n[[hardware.nodes]]\nhost = "node1"\n'
        'ip = "10.213.0.2"\n').replace("[hardware]\n", "[hardware]\nenv_script = \"{env}\"\n").replace(
        "[export]\n", "[export]\npredict_data = \"hello\"\n")


@fuzz(40)
@given(setting=script_settings())
def test_no_manifest_string_runs_as_a_command_in_a_generated_script(script_manifest, setting):
    """For any string set on a key that reaches node_K.sh, slurm.sbatch, predict.sh or lite_infer.sh: `set` refuses
    it naming the key, or every script is valid bash whose only commands are the ones qwenbuild wrote, each value
    one word."""
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.manifest import load_manifest
    from qwenbuild.tasks.deploy import lite_infer_script, predict_script
    from qwenbuild.tasks.distributed import node_scripts

    key, value = setting
    SENTINEL_FILE.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "env.sh").write_text("export FROM_ENV_SCRIPT=1\n")
        path = tmp / "qwen.toml"
        path.write_text(script_manifest.replace("{env}", str(tmp / "env.sh")), encoding="utf-8")
        before = path.read_bytes()
        rc, err = run_cli(["set", "-c", str(path), f"{key}={json.dumps(value)}"], tmp)
        check_outcome(rc, err, [key], tmp, {path: before})
        TALLY["script strings refused" if rc else "script strings accepted"] += 1
        if rc:
            return
        m = load_manifest(path)
        build = BuildDir(m.build_dir)
        build.root.mkdir(parents=True, exist_ok=True)  # slurm.sbatch changes to it (the others to where they lie)
        scripts = dict(node_scripts(m, build), **{"predict.sh": predict_script(m, build, m.export.predict_data),
                                                  "lite_infer.sh": lite_infer_script(m, build, m.export.predict_data)})
        bin_dir = _stub_bin(tmp / "stub-bin", tmp / "calls.jsonl")
        hosts = [n.host for n in m.hardware.nodes]
        for name, text in scripts.items():
            (tmp / "calls.jsonl").unlink(missing_ok=True)
            k = int(name[5]) if name.startswith("node_") else 0
            proc = _run_script(text, tmp, bin_dir, hosts[1] if name == "slurm.sbatch" else None)
            assert not SENTINEL_FILE.exists(), f"{key}={value!r} ran a command in {name}:\n{text}"
            k = 1 if name == "slurm.sbatch" else k
            calls = [json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()] \
                if (tmp / "calls.jsonl").exists() else []
            env_script = m.hardware.env_script
            if "/" in m.hardware.python or env_script is not None and not Path(env_script).is_file():
                # a python or environment script the nodes do not have: the script stops before running anything
                assert proc.returncode != 0 and not calls, (name, proc.stderr)
                continue
            single = name in ("predict.sh", "lite_infer.sh")  # node 0 alone, no node_check
            assert proc.returncode == 0 and len(calls) == (1 if single else 2), (name, proc.stderr)
            # each value arrived as one argument, unchanged
            *check, msrun = calls
            assert msrun[:3] == [m.hardware.python.rsplit("/", 1)[-1], "-m", "mindspore.parallel.cluster.run"]
            if check:
                args = check[0]
                assert args[1:3] == ["-m", "qwenbuild.train.node_check"]
                assert args[args.index("--host") + 1] == hosts[k] and args[args.index("--ip") + 1] == \
                    m.hardware.nodes[k].ip and args[args.index("--build_dir") + 1] == "."  # where the scripts run
                assert f"--node_rank={k}" in msrun
            else:
                assert msrun[msrun.index("--predict_data") + 1] == m.export.predict_data


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from qwenbuild.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(["Repeat the digits 0123456789 please."] * 20, 270, path)
    return path


def _argument_after(script: Path, flag: str) -> str:
    """The value bash passes after `flag` on the script's exec line (its command swapped for printf)."""
    text = script.read_bytes().decode("utf-8")  # lines as bash splits them: at \n only
    line = next(x for x in text.split("\n") if x.startswith("exec "))
    proc = subprocess.run(["bash", "-c", "printf '%s\\0' " + line[len("exec "):]], capture_output=True,
                          timeout=30, env=dict(os.environ, MASTER_PORT="1"))
    args = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
    return args[args.index(flag) + 1]


@fuzz(30)
@given(prompt=st.text(max_size=24))
def test_a_generated_prompt_is_refused_or_reaches_the_scripts_as_written(small_tokenizer, prompt):
    """export.predict_data is validated once, in the manifest, and what passes arrives byte for byte as the
    --predict_data of predict.sh and lite_infer.sh (bash parsing their quoting)."""
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.manifest import load_manifest
    from qwenbuild.tasks import task_specs
    from qwenbuild.tasks.context import Context, DeclaredManifest

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "qwen.toml"
        value = json.dumps(prompt, ensure_ascii=False)
        path.write_bytes(BASE_TOML.replace("use_past = true", f"use_past = true\npredict_data = {value}")
                         .encode("utf-8", "surrogatepass"))
        rc, err = run_cli(["validate", "-c", str(path)], tmp)
        check_outcome(rc, err, [str(path)], tmp, {})
        assert rc in (0, 2), err
        TALLY["prompts refused" if rc else "prompts written"] += 1
        if rc:
            return
        m = load_manifest(path)
        assert prompt.strip() and "\0" not in prompt
        (tmp / "build").mkdir()
        (tmp / "build" / "tokenizer").symlink_to(small_tokenizer)
        for spec in task_specs(m):
            if spec.name in ("predict", "lite_infer"):
                spec.action(Context(spec.name, DeclaredManifest(m, spec.name, spec.keys), BuildDir(m.build_dir)))
        for script in (tmp / "build" / "predict" / "predict.sh", tmp / "build" / "lite_infer" / "lite_infer.sh"):
            assert _argument_after(script, "--predict_data") == prompt, script


# ---------------------------------------------------------------- alpaca rows and preprocess

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
good_rows = st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=30), "output": st.text(max_size=30)},
                                  optional={"input": st.text(max_size=10)})
bad_rows = st.dictionaries(st.sampled_from(["instruction", "input", "output", "x"]), json_values) | json_values
rows = st.lists(good_rows, min_size=1, max_size=6) | st.lists(st.one_of(good_rows, bad_rows), max_size=6)


@st.composite
def alpaca_files(draw) -> bytes:
    data = draw(rows)
    layout = draw(st.sampled_from(["array", "array", "lines", "lines", "pretty", "object"]))
    if layout == "array":
        text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    elif layout == "pretty":
        text = json.dumps(data, indent=1, ensure_ascii=False)
    elif layout == "object":
        text = json.dumps(data[0] if data else {}, indent=draw(st.sampled_from([None, 2])))
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in data)
    raw = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bytes", "deep"]))
    if damage == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif damage == "deep":
        raw = b"[" * 50000 + b"]" * 50000
    return raw


@pytest.fixture(scope="module")
def qwen_vocab(qwen_dir):
    return qwen_dir


@fuzz(40)
@given(data=alpaca_files(), seq_length=st.integers(1, 160), mask=st.booleans())
def test_generated_alpaca_rows_convert_and_preprocess_cleanly(qwen_vocab, data, seq_length, mask):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data.json").write_bytes(data)
        out = tmp / "chat.jsonl"
        out.write_bytes(SENTINEL)
        rc, err = run_cli(["alpaca_converter", "--data_path", "data.json", "--output_path", str(out)], tmp)
        check_outcome(rc, err, ["data.json"], tmp, {out: SENTINEL})
        TALLY["alpaca converted" if rc == 0 else "alpaca refused"] += 1
        if rc != 0:
            return
        for line in out.read_text(encoding="utf-8").split("\n")[:-1]:  # NEL and U+2028 live inside rows
            assert json.loads(line)["messages"][-1]["role"] == "assistant"
        record = tmp / "train.mindrecord"
        record.write_bytes(SENTINEL)
        argv = ["preprocess", "--input_glob", str(out), "--vocab_file", str(qwen_vocab / "vocab.json"),
                "--merges_file", str(qwen_vocab / "merges.txt"), "--seq_length", str(seq_length),
                "--output_file", str(record), "--processes", "0"] + (["--mask_prompt"] if mask else [])
        rc, err = run_cli(argv, tmp)
        check_outcome(rc, err, ["chat.jsonl", "seq_length"], tmp, {record: SENTINEL})
        TALLY["preprocessed" if rc == 0 else "preprocess refused"] += 1
        if rc == 0:
            assert Path(str(record) + ".db").is_file()


# ---------------------------------------------------------------- checkpoints and safetensors

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny HF model and its converted MindSpore checkpoint (qwenbuild's own writer, with the config entry)."""
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.random_init import write_random_hf_model

    root = tmp_path_factory.mktemp("weights")
    cfg = QwenConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, n_kv_heads=1, intermediate_size=32)
    write_random_hf_model(cfg, 0, root / "hf")
    rc, err = run_cli(["convert_weight", "--torch_ckpt_dir", "hf", "--mindspore_ckpt_path", "ms.ckpt"], root)
    assert rc == 0, err
    return root


@st.composite
def damaged(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "overwrite", "insert", "append"]))
    if kind == "flip":
        at = draw(st.integers(0, len(data) * 8 - 1))
        out = bytearray(data)
        out[at // 8] ^= 1 << (at % 8)
        return bytes(out)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    blob = draw(st.binary(min_size=1, max_size=16))
    at = draw(st.integers(0, len(data)))
    if kind == "overwrite":
        out = data[:at] + blob + data[at + len(blob):]
        return out if out != data else data[:-1]
    if kind == "insert":
        return data[:at] + blob + data[at:]
    return data + blob


@fuzz(40)
@given(data=st.data())
def test_damaged_checkpoints_are_refused_by_convert_reversed(weights, data):
    """Every change to a checkpoint qwenbuild wrote is found: its CRC covers every byte."""
    original = (weights / "ms.ckpt").read_bytes()
    bad = data.draw(damaged(original))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bad.ckpt").write_bytes(bad)
        rc, err = run_cli(["convert_reversed", "--mindspore_ckpt_path", "bad.ckpt", "--torch_ckpt_path", "out"],
                          tmp)
        check_outcome(rc, err, ["bad.ckpt"], tmp, {})
        assert rc != 0, "a damaged checkpoint was converted"
        assert not (tmp / "out").exists()


SAFETENSORS_TYPES = ["F32", "F16", "BF16", "I64", "F64", "U8", "BOOL", "F8_E4M3", "X9", ""]


@st.composite
def safetensors_files(draw, names: list[str]) -> bytes:
    header, offset = {}, 0
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(-2, 40), max_size=3))
        size = draw(st.integers(0, 64))
        start = draw(st.sampled_from([offset, max(0, offset - 4), offset + 8]))
        header[name] = {"dtype": draw(st.sampled_from(SAFETENSORS_TYPES)), "shape": shape,
                        "data_offsets": draw(st.sampled_from([[start, start + size], [start + size, start],
                                                              [start], "0-4", None]))}
        offset = start + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 5}, [], None]))
    head = json.dumps(header).encode()
    length = draw(st.sampled_from([len(head), len(head) + 3, max(0, len(head) - 3), 1 << 40]))
    return struct.pack("<Q", length) + head + bytes(draw(st.integers(0, 256)))


@fuzz(40)
@given(data=st.data())
def test_generated_safetensors_headers_are_refused_or_converted(weights, data):
    from qwenbuild.weights import safetensors_file

    names = [e.name for e in safetensors_file.read_header(weights / "hf" / "model.safetensors")[0]]
    blob = data.draw(safetensors_files(names))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_bytes((weights / "hf" / "config.json").read_bytes())
        (tmp / "hf" / "model.safetensors").write_bytes(blob)
        out = tmp / "ms.ckpt"
        out.write_bytes(SENTINEL)
        rc, err = run_cli(["convert_weight", "--torch_ckpt_dir", "hf", "--mindspore_ckpt_path", str(out)], tmp)
        check_outcome(rc, err, ["model.safetensors", "hf"], tmp, {out: SENTINEL})
        assert rc != 0, "a model with missing or mangled tensors was converted"


# ---------------------------------------------------------------- prompts

prompt_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                      max_size=40)


@fuzz(200)
@given(text=prompt_text, raw=st.booleans())
def test_generated_prompts_encode_or_are_refused(qwen_vocab, text, raw):
    from qwenbuild.errors import UserError
    from qwenbuild.infer.prompt import encode
    from qwenbuild.tokenizer.load import load_tokenizer

    tokenizer = _tokenizer(str(qwen_vocab), load_tokenizer)
    TALLY["cases"] += 1
    try:
        ids = encode(tokenizer, text, raw=raw)
    except UserError as exc:
        assert "prompt" in str(exc) or "predict_data" in str(exc)
        return
    assert ids and all(isinstance(i, int) and 0 <= i < 151646 for i in ids)
    # Qwen's tokenizer stores text in Unicode normal form C
    expected = unicodedata.normalize("NFC", text) if raw else "assistant\n"
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith(expected)


_tokenizers: dict = {}


def _tokenizer(path: str, load):
    if path not in _tokenizers:
        _tokenizers[path] = load(path)
    return _tokenizers[path]


# ---------------------------------------------------------------- outputs among what the user has

@pytest.fixture(scope="module")
def kit(weights):
    """Inputs of every command that writes: the user's own files (no seal of qwenbuild's in them)."""
    root = weights / "kit"
    root.mkdir()
    rows = [{"instruction": f"Repeat {w}", "input": "", "output": w} for w in ("one", "two", "three", "four")]
    (root / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    for argv in (["alpaca_converter", "--data_path", "data.json", "--output_path", "chat.jsonl"],
                 ["tokenizer", "--output_dir", "tok", "--train_from", "data.json", "--vocab_size", "280"],
                 ["strategy", "--model_dir", "hf", "--data_parallel", "2", "--output_dir", "strategy"],
                 ["hccl_tools", "--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf", "hccn.conf",
                  "--output", "rt.json"]):
        if argv[0] == "hccl_tools":
            (root / "hccn.conf").write_text("address_0=192.168.1.1\naddress_1=192.168.1.2\n")
        if argv[0] == "strategy":
            shutil.copytree(weights / "hf", root / "hf")
            shutil.copy2(weights / "ms.ckpt", root / "ms.ckpt")
        rc, err = run_cli(argv, root)
        assert rc == 0, err
    for seal in root.rglob(".qwenbuild-seal.json"):
        seal.unlink()
    return root


WRITERS = {  # argv with OUT, the inputs it reads, and what OUT is: a file, a directory, or a directory written into
    "alpaca_converter": (["alpaca_converter", "--data_path", "data.json", "--output_path", "OUT"], ["data.json"],
                         "file"),
    "preprocess": (["preprocess", "--input_glob", "chat.jsonl", "--vocab_file", "tok/vocab.json", "--merges_file",
                    "tok/merges.txt", "--seq_length", "128", "--processes", "0", "--output_file", "OUT"],
                   ["chat.jsonl", "tok/vocab.json", "tok/merges.txt"], "file"),
    "convert_weight": (["convert_weight", "--torch_ckpt_dir", "hf", "--mindspore_ckpt_path", "OUT"],
                       ["hf/config.json", "hf/model.safetensors"], "file"),
    "convert_reversed": (["convert_reversed", "--mindspore_ckpt_path", "ms.ckpt", "--torch_ckpt_path", "OUT"],
                         ["ms.ckpt"], "dir"),
    "tokenizer": (["tokenizer", "--output_dir", "OUT", "--train_from", "data.json", "--vocab_size", "280"],
                  ["data.json"], "dir"),
    "strategy": (["strategy", "--model_dir", "hf", "--data_parallel", "2", "--output_dir", "OUT"],
                 ["hf/config.json"], "dir"),
    "merge_hccl": (["merge_hccl", "rt.json", "--output", "OUT"], ["rt.json"], "file"),
    "instructions": (["instructions", "--output_dir", "OUT", "--num_train", "5", "--num_heldout", "1"], [], "into"),
    "transform_ckpt": (["transform_ckpt", "--src_ckpt_dir", "ms.ckpt", "--dst_ckpt_strategy", "strategy",
                        "--dst_ckpt_dir", "OUT"], ["ms.ckpt", "strategy/ckpt_strategy_rank_0.json"], "into"),
}
# where an output may be pointed among what the user has; a regular file that is no input is not among them:
# naming it as the output asks for it to be replaced, as cp or tar -f do
SPOTS = ["input", "hard link of an input", "inside the input dir", "working dir", "dir of the user's", "link to a file",
         "link to a dir", "dangling link", "device", "fifo", "file where a dir goes"]


def _what_is_there(root: Path) -> dict[str, tuple]:
    """Every entry below `root` by relative path: a link by its target, a file by its bytes, a directory as such."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("special", os.lstat(p).st_mode)
    return out


def _spot(case: Path, spot: str, inputs: list[str], kind: str) -> str | None:
    """The output path for a spot, made in the case's directory; None when the spot does not apply."""
    (case / "notes.txt").write_bytes(SENTINEL)
    (case / "mine").mkdir()
    (case / "mine" / "notes.txt").write_bytes(SENTINEL)
    if spot == "input":
        return inputs[0] if inputs else None
    if spot == "hard link of an input":
        if not inputs:
            return None
        os.link(case / inputs[0], case / "hardlink")
        return "hardlink"
    if spot == "inside the input dir":
        folders = [str(Path(i).parent) for i in inputs if Path(i).parent != Path(".")]
        return f"{folders[0]}/new" if folders else None
    if spot == "working dir":
        return "."
    if spot == "dir of the user's":
        return "mine"
    if spot == "link to a file":
        (case / "link").symlink_to("notes.txt")
        return "link"
    if spot == "link to a dir":
        (case / "dlink").symlink_to("mine")
        return "dlink"
    if spot == "dangling link":
        (case / "dangling").symlink_to("nowhere")
        return "dangling"
    if spot == "device":
        return os.devnull
    if spot == "fifo":
        os.mkfifo(case / "fifo")
        return "fifo"
    return "notes.txt" if kind == "dir" else None


@fuzz(30)
@given(name=st.sampled_from(sorted(WRITERS)), spot=st.sampled_from(SPOTS))
def test_no_output_path_changes_a_byte_the_user_had(kit, name, spot):
    """Any output path among the user's inputs, links, devices, pipes and directories: the run is refused, naming
    the path, or writes only new paths; every byte, link and device the user had is as it was."""
    argv, inputs, kind = WRITERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case"
        shutil.copytree(kit, case, symlinks=True)
        out = _spot(case, spot, inputs, kind)
        if out is None:
            return
        before = _what_is_there(case)
        device = os.stat(os.devnull).st_mode
        rc, err = run_cli([out if a == "OUT" else a for a in argv], case)
        assert "Traceback" not in err, err
        after = _what_is_there(case)
        changed = [rel for rel, what in before.items() if after.get(rel) != what]
        assert not changed, f"{name} -> {out} ({spot}), exit {rc}: changed {changed}\n{err}"
        assert os.stat(os.devnull).st_mode == device
        if rc != 0:
            assert Path(out).name in err or out in err, f"exit {rc} without naming {out}:\n{err}"
        assert not leftovers(case), leftovers(case)
        TALLY["outputs refused" if rc else "outputs written beside"] += 1


@pytest.mark.slow
def test_a_copied_project_never_writes_into_the_original(tmp_path, qwen_dir):
    """`cp -a project copy`, then the tasks that need no training in the copy: the original keeps every byte, and
    no file the copy's build holds names the original (launch scripts, run.json, the YAMLs, predict.sh and
    lite_infer.sh name paths relative to where they run; slurm.sbatch, which Slurm runs from a copy of itself, is
    rebuilt for the copy)."""
    from qwenbuild.manifest.edit import set_keys

    original = tmp_path / "project"
    original.mkdir()
    for name in ("qwen.toml", "dodo.py"):
        shutil.copy2(REPO / name, original / name)
    # the default, with fewer rows and the session's Qwen tokenizer files (built once, copied by the task)
    set_keys(original / "qwen.toml", [("dataset.num_train", "300"), ("dataset.num_heldout", "10"),
                                      ("tokenizer.kind", '"hf"'), ("tokenizer.dir", json.dumps(str(qwen_dir)))])
    doit = [str(Path(sys.executable).parent / "doit"), "launch", "run_config", "mindrecord", "strategy", "shard",
            "predict", "lite_infer"]
    proc = subprocess.run(doit, cwd=original, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    before = _what_is_there(original)
    proc = subprocess.run(doit, cwd=copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    TALLY["cases"] += 1
    after = _what_is_there(original)
    assert [rel for rel in before if after.get(rel) != before[rel]] == []
    assert sorted(set(after) - set(before)) == []
    # the stat cache is keyed by absolute path (a cache: a copy misses it and hashes again)
    naming = [p.relative_to(copy).as_posix() for p in (copy / "build").rglob("*") if p.is_file()
              and p.name not in ("qwen.lock.stat", ".doit.db") and str(original).encode() in p.read_bytes()]
    assert naming == []
    reran = re.findall(r"^qwenbuild (\w+): runs because (.*)$", proc.stderr, re.M)
    assert reran == [("launch", f"build dir (absolute path): '{original / 'build'}' -> '{copy / 'build'}'")], reran


# ---------------------------------------------------------------- signals at random moments

@pytest.fixture(scope="module")
def inputs(weights, qwen_dir):
    """Inputs big enough that each command runs for a while, so a signal can land in the middle of its work."""
    root = weights
    big = [{"instruction": f"Write {i} words about rivers number {i}", "input": "", "output": "water " * (i % 60)}
           for i in range(30000)]
    (root / "alpaca.json").write_text(json.dumps(big), encoding="utf-8")
    rc, err = run_cli(["alpaca_converter", "--data_path", "alpaca.json", "--output_path", "chat.jsonl"], root)
    assert rc == 0, err
    for name in ("vocab.json", "merges.txt"):
        (root / name).write_bytes((qwen_dir / name).read_bytes())
    (root / "qwen.toml").write_text(BASE_TOML, encoding="utf-8")
    return root


COMMANDS = {  # argv, and the path it writes (OUT)
    "validate": ["validate", "-c", "qwen.toml"],
    "plan": ["plan", "-c", "qwen.toml"],
    "alpaca_converter": ["alpaca_converter", "--data_path", "alpaca.json", "--output_path", "OUT"],
    "preprocess": ["preprocess", "--input_glob", "chat.jsonl", "--vocab_file", "vocab.json", "--merges_file",
                   "merges.txt", "--seq_length", "256", "--output_file", "OUT"],
    "convert_weight": ["convert_weight", "--torch_ckpt_dir", "hf", "--mindspore_ckpt_path", "OUT"],
    "convert_reversed": ["convert_reversed", "--mindspore_ckpt_path", "ms.ckpt", "--torch_ckpt_path", "OUT"],
    "tokenizer": ["tokenizer", "--output_dir", "OUT"],
    "instructions": ["instructions", "--output_dir", "OUT", "--num_train", "20000"],
    "strategy": ["strategy", "--model_dir", "hf", "--data_parallel", "1", "--model_parallel", "1",
                 "--pipeline_stage", "1", "--output_dir", "OUT"],
    "export": ["export", "--load_checkpoint", "ms.ckpt", "--torch_ckpt_dir", "hf", "--output_dir", "OUT",
               "--seq_length", "32"],
}


def _before_the_program(err: str) -> bool:
    """A Ctrl-C that landed while the interpreter was still starting (every frame Python's own start-up, or its
    `site` module importing the environment's path hooks, on a loaded machine later than the 0.2 s the harness
    waits): no program can handle it, Python reports it."""
    frames = [line for line in err.splitlines() if line.strip().startswith('File "')]
    if not err.rstrip().endswith("KeyboardInterrupt") or not frames:
        return False
    return all('File "<frozen ' in line for line in frames) or \
        err.startswith("Fatal Python error: init_import_site:") and f"{REPO / 'qwenbuild'}/" not in err


def _start(inputs: Path, name: str, out: Path) -> subprocess.Popen:
    argv = [str(out) if a == "OUT" else a for a in COMMANDS[name]]
    return subprocess.Popen([sys.executable, "-m", "qwenbuild", *argv], cwd=inputs, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _contents(path: Path) -> dict[str, bytes | None]:
    """What a command wrote, by relative name; MINDIR bytes differ from run to run, so only their names count."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): None if p.suffix == ".mindir" else p.read_bytes() for p in files}


# commands whose output directory is replaced as a whole: an existing one must be qwenbuild's own
REPLACED_WHOLE = ("convert_reversed", "strategy", "tokenizer")


def _reference_output(inputs: Path, name: str) -> Path:
    return inputs / f"reference-{name}" / "out"


def _reference(inputs: Path, name: str) -> tuple[dict, float]:
    """The output of an uninterrupted run and how long it took (kept as _reference_output). It has the interrupted
    runs' name "out": a MindRecord file holds its own name."""
    out = _reference_output(inputs, name)
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir()
    started = time.monotonic()
    proc = _start(inputs, name, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    return _contents(out), time.monotonic() - started


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_signal_at_a_random_moment_stops_the_command_cleanly(inputs, name):
    reference, seconds = _reference(inputs, name)

    @fuzz(2, shrink=False)
    @given(moment=st.floats(0.0, 1.0), sig=st.sampled_from([signal.SIGINT, signal.SIGTERM]),
           whole_group=st.booleans(), existing=st.booleans())
    def interrupted(moment, sig, whole_group, existing):
        with tempfile.TemporaryDirectory(dir=inputs) as tmp:
            out = Path(tmp) / "out"
            if existing and set(reference) == {"."}:  # an earlier output an interrupted run must leave as it was
                out.write_bytes(SENTINEL)
            elif existing and name in REPLACED_WHOLE:  # the earlier output qwenbuild wrote (a user's is refused)
                shutil.copytree(_reference_output(inputs, name), out)
            elif existing:
                out.mkdir()
                (out / "earlier.txt").write_bytes(SENTINEL)
            before = _contents(out)
            proc = _start(inputs, name, out)
            time.sleep(0.2 + moment * seconds)  # from just after start-up to the end of an uninterrupted run
            if proc.poll() is None:
                (os.killpg if whole_group else os.kill)(proc.pid, sig)
                TALLY["signals"] += 1
            _, err_bytes = proc.communicate(timeout=120)
            err = err_bytes.decode(errors="replace")
            TALLY["cases"] += 1
            before_start = _before_the_program(err)
            assert "Traceback" not in err and "Fatal Python error" not in err or before_start, err
            assert proc.returncode in (0, 1, 128 + sig, -sig) if before_start else \
                proc.returncode in (0, 128 + sig, -sig), (proc.returncode, err)
            if proc.returncode != 0 and not before_start:
                assert "interrupted" in err or proc.returncode == -sig, err
            # the signal may land after the output was promoted: then it is the whole output, never a part of it
            # (commands that write into a directory, like export and instructions, keep what else it holds)
            assert _contents(out) in (before, reference, {**before, **reference}), \
                "an interrupted run left a partial or damaged output"
            assert not leftovers(Path(tmp)), leftovers(Path(tmp))
            assert not _survivors(proc.pid), "processes outlived the interrupted command"

    interrupted()


def _survivors(pgid: int, grace: float = 3.0) -> list[str]:
    """Processes of the command's group still there after `grace` seconds (a killed child takes a moment)."""
    deadline = time.monotonic() + grace
    while True:
        found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_zz_tally():
    """The figures for the README's reliability section (runs last in this file)."""
    print(f"\nfuzz: {TALLY['cases']} cases generated, {TALLY['signals']} signals sent, failures 0 "
          f"(QWENBUILD_FUZZ_SCALE={SCALE}); " + ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())
                                                          if k not in ("cases", "signals")))
    assert TALLY["cases"] > 0
