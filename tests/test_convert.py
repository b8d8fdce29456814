"""convert_weight: HF directory -> MindSpore .ckpt, streamed; bytes equal to mindspore.save_checkpoint's (with its
CRC trailer)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tiny import tiny_hf_model
from qwenbuild.errors import UserError
from qwenbuild.model.params import CONFIG_ENTRY, hf_to_ms, parameter_shapes
from qwenbuild.model.config import QwenConfig
from qwenbuild.weights import convert_weight
from qwenbuild.weights.mindspore_ckpt import read_tensors

QWENBUILD = Path(sys.executable).parent / "qwenbuild"


def _reference_ckpt(model, cfg, path, ms_dtype=None):
    """What the original algorithm writes: every parameter through mindspore.save_checkpoint, in network order;
    then the model's config.json as a string entry (save_checkpoint's append_dict), and the CRC trailer."""
    state = {hf_to_ms(n): t for n, t in model.state_dict().items() if n != "lm_head.weight" or not
             cfg.tie_word_embeddings}
    entries = []
    for name in parameter_shapes(cfg):
        t = state[name]
        data = ms.Tensor(t.float().numpy())
        target = ms_dtype or {torch.float32: ms.float32, torch.bfloat16: ms.bfloat16}[t.dtype]
        entries.append({"name": name, "data": data.astype(target)})
    dtype = {ms.float32: "float32", ms.bfloat16: "bfloat16", ms.float16: "float16"}[target]
    stored = json.dumps(dataclasses.replace(cfg, param_dtype=dtype).to_hf_dict(), sort_keys=True)
    ms.save_checkpoint(entries, str(path), append_dict={CONFIG_ENTRY: stored}, crc_check=True)
    return path.read_bytes()


@pytest.mark.parametrize("tied", [False, True])
def test_float32_output_is_byte_identical_to_save_checkpoint(tmp_path, tied):
    model = tiny_hf_model(tmp_path / "hf", tied=tied)
    cfg = QwenConfig.from_hf_dir(tmp_path / "hf")
    summary = convert_weight(tmp_path / "hf", tmp_path / "out.ckpt", progress=None)
    assert (tmp_path / "out.ckpt").read_bytes() == _reference_ckpt(model, cfg, tmp_path / "ref.ckpt")
    assert summary["tensors"] == len(parameter_shapes(cfg)) and summary["dtypes"] == ["float32"]
    loaded = ms.load_checkpoint(str(tmp_path / "out.ckpt"), crc_check=True)
    assert list(loaded) == list(parameter_shapes(cfg)) + [CONFIG_ENTRY]
    assert QwenConfig.from_hf_dict(json.loads(loaded[CONFIG_ENTRY])) == cfg


def test_dtype_option_casts_like_mindspore(tmp_path):
    model = tiny_hf_model(tmp_path / "hf")
    cfg = QwenConfig.from_hf_dir(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "out.ckpt", "bf16", progress=None)
    expected = _reference_ckpt(model, cfg, tmp_path / "ref.ckpt", ms.bfloat16)
    assert (tmp_path / "out.ckpt").read_bytes() == expected
    convert_weight(tmp_path / "hf", tmp_path / "half.ckpt", "fp16", progress=None)
    assert (tmp_path / "half.ckpt").read_bytes() == _reference_ckpt(model, cfg, tmp_path / "ref16.ckpt", ms.float16)


def test_bfloat16_source_keeps_its_bits(tmp_path):
    tiny_hf_model(tmp_path / "hf", dtype=torch.bfloat16)
    source = load_file(tmp_path / "hf" / "model.safetensors")
    convert_weight(tmp_path / "hf", tmp_path / "out.ckpt", progress=None)
    tensors = [t for t in read_tensors(tmp_path / "out.ckpt") if t.name != CONFIG_ENTRY]
    assert {t.type_name for t in tensors} == {"BFloat16"}
    for t in tensors:
        raw = b"".join(t.chunks())
        hf_name = [n for n in source if hf_to_ms(n) == t.name][0]
        assert raw == source[hf_name].view(torch.int16).numpy().tobytes(), t.name


@pytest.mark.parametrize("layout", ["sharded", "bin", "bin_sharded"])
def test_sharded_and_pickled_inputs_give_the_same_checkpoint(tmp_path, layout):
    tiny_hf_model(tmp_path / "single")
    convert_weight(tmp_path / "single", tmp_path / "single.ckpt", progress=None)
    kwargs = {"max_shard_size": "20KB"} if layout != "bin" else {}
    model = tiny_hf_model(tmp_path / "other", **kwargs)
    if layout.startswith("bin"):
        for f in (tmp_path / "other").glob("model*.safetensors*"):
            f.unlink()
        model.save_pretrained(tmp_path / "other", safe_serialization=False, **kwargs)
    weights = [p.name for p in (tmp_path / "other").iterdir() if p.suffix in (".bin", ".safetensors")]
    assert len(weights) == 1 if layout == "bin" else len(weights) > 2, weights
    convert_weight(tmp_path / "other", tmp_path / "other.ckpt", progress=None)
    assert (tmp_path / "other.ckpt").read_bytes() == (tmp_path / "single.ckpt").read_bytes()


def _expect_failure(tmp_path, match, out_name="out.ckpt"):
    out = tmp_path / out_name
    with pytest.raises(UserError, match=match) as err:
        convert_weight(tmp_path / "hf", out, progress=None)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    return str(err.value)


def test_truncated_safetensors_writes_nothing(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    _expect_failure(tmp_path, "model.safetensors is truncated")


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(31)
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    text = _expect_failure(tmp_path, "does not match the model configuration")
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected (1): model.layers.0.mlp.extra.weight" in text
    assert "wrong shape (1): model.layers.0.self_attn.q_proj.bias (31,) (expected (32,))" in text


def test_config_mismatch_keeps_the_previous_output(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    (tmp_path / "out.ckpt").write_bytes(b"previous")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    layer_2 = r"missing \(12\): model.layers.2.post_attention_layernorm.weight, model.layers.2.input_layernorm"
    with pytest.raises(UserError, match=layer_2):
        convert_weight(tmp_path / "hf", tmp_path / "out.ckpt", progress=None)
    assert (tmp_path / "out.ckpt").read_bytes() == b"previous"


def test_pickle_with_code_is_refused(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Path("/etc/passwd")}, tmp_path / "hf" / "pytorch_model.bin")
    _expect_failure(tmp_path, "refusing to unpickle")


def test_command_line_progress_summary_and_errors(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    run = subprocess.run([str(QWENBUILD), "convert_weight", "--torch_ckpt_dir", str(tmp_path / "hf"),
                          "--mindspore_ckpt_path", str(tmp_path / "cli.ckpt"), "--dtype", "bf16"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("[1/27] model.embed_tokens.weight -> model.tok_embeddings.embedding_weight [96, 32]")
    assert lines[-1].startswith("converted 27 tensors (") and "bfloat16" in lines[-1]
    assert {t.type_name for t in read_tensors(tmp_path / "cli.ckpt") if t.name != CONFIG_ENTRY} == {"BFloat16"}
    bad = subprocess.run([str(QWENBUILD), "convert_weight", "--torch_ckpt_dir", str(tmp_path / "nowhere"),
                          "--mindspore_ckpt_path", str(tmp_path / "x.ckpt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nowhere" in bad.stderr
    assert not (tmp_path / "x.ckpt").exists()
