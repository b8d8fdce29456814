"""The online predict the seed runs with MindFormers: its tokenizer built by MindFormers' own build_tokenizer from the
generated YAML, and predict.sh run here as far as a CPU lets MindFormers go."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
TEXTS = ["Hello, world!", "帮助我制定一份去上海的旅游攻略", "<|im_start|>user\nRepeat 12 3<|im_end|>\n",
         "  a\n\nb  "]


def predict_manifest(directory: Path) -> Path:
    """The default, small, predicting from the converted weights on one CPU card."""
    text = (REPO / "qwen.toml").read_text(encoding="utf-8")
    for old, new in (("num_train = 4000", "num_train = 300"), ("num_heldout = 200", "num_heldout = 20"),
                     ('checkpoint = "finetuned"', 'checkpoint = "converted"'),
                     ("model_parallel = 2  #", "model_parallel = 1  #")):
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "qwen.toml"
    path.write_text(text, encoding="utf-8")
    return path


def doit(manifest: Path, *tasks: str) -> None:
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *tasks], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_the_predict_yaml_tokenizer_builds_through_mindformers(tmp_path, qwen_dir, monkeypatch):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerConfig

    from qwenbuild.tokenizer import load_tokenizer
    from qwenbuild.train.mindformers_tokenizer import register_qwen2_tokenizer

    manifest = predict_manifest(tmp_path)
    doit(manifest, "predict")
    config = MindFormerConfig(str(tmp_path / "build" / "predict" / "predict_qwen1_5.yaml"))
    assert config.processor.tokenizer.type == "Qwen2Tokenizer"
    register_qwen2_tokenizer()  # what mindformers_run.py does before the Trainer builds it
    # the YAML names the tokenizer files relative to build/predict/, where predict.sh runs it
    assert config.processor.tokenizer.vocab_file == "../tokenizer/vocab.json"
    monkeypatch.chdir(tmp_path / "build" / "predict")
    tokenizer = build_tokenizer(config.processor.tokenizer)
    reference = load_tokenizer(tmp_path / "build" / "tokenizer")
    for text in TEXTS:
        ids = tokenizer(text, return_tensors=None, add_special_tokens=True, padding=True)["input_ids"]
        assert ids == reference.encode(text), text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == reference.convert_tokens_to_ids("<|endoftext|>")
    # the real Qwen1.5 vocabulary (rebuilt offline) in the same YAML entry: the published ids
    config.processor.tokenizer.vocab_file = str(qwen_dir / "vocab.json")
    config.processor.tokenizer.merges_file = str(qwen_dir / "merges.txt")
    qwen = build_tokenizer(config.processor.tokenizer)
    assert qwen("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert qwen("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]
    assert qwen.decode([[9707, 11, 1879, 0, 151643]], skip_special_tokens=True) == ["Hello, world!"]


@pytest.mark.slow
def test_predict_sh_runs_mindformers_until_the_first_ascend_only_kernel(tmp_path):
    """predict.sh as generated: msrun starts MindFormers' Trainer.predict on the YAML; the config, the tokenizer and
    the network build and every weight loads, then use_past's rotary kernel refuses the CPU's float32."""
    from qwenbuild.parallel.launch_scripts import free_port

    manifest = predict_manifest(tmp_path)
    doit(manifest, "predict", "convert")
    build = tmp_path / "build"
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(build / "predict" / "predict.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (build / "predict" / "output" / "msrun_log" / "worker_0.log").read_text(errors="replace")
    assert proc.returncode != 0
    assert "Can't find class type tokenizer" not in log
    assert "mindformers_run: CPU: model.model_config.compute_dtype = 'float32'" not in log  # the YAML says so already
    loaded = re.search(r"Network parameters are not loaded: \((\[.*?\]), (\[.*?\])\)", log)
    assert loaded, log[-3000:]
    missing, unused = ast.literal_eval(loaded.group(1)), ast.literal_eval(loaded.group(2))
    # of the network only the paged-attention caches are not in the checkpoint: every weight was loaded
    assert missing and all(name.endswith(("key_cache", "value_cache")) for name in missing), missing
    assert unused == ["hf_config_json"]
    assert ("For primitive[ApplyRotaryPosEmb], the input argument[key] must be a type of {Tensor[BFloat16], "
            "Tensor[Float16]}, but got Tensor[Float32]") in log
    # MindFormers' own outputs went to predict/output/: the generated files are still what qwen.lock says
    assert (build / "predict" / "output" / "log").is_dir()
    rerun = subprocess.run(DOIT + [f"manifest={manifest}", "predict"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0 and "-- predict" in rerun.stdout
