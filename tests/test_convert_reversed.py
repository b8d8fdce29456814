"""convert_reversed: MindSpore .ckpt -> Hugging Face directory; HF -> MindSpore -> HF is bit-exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from hf_tiny import tiny_hf_model
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import CONFIG_ENTRY
from qwenbuild.weights import convert_reversed, convert_weight
from qwenbuild.weights.reverse import infer_config

QWENBUILD = Path(sys.executable).parent / "qwenbuild"


def _hf_tensors(directory: Path) -> dict:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("dtype,tied,n_kv_heads", [(torch.float32, False, 2), (torch.bfloat16, True, 4),
                                                   (torch.bfloat16, False, 2), (torch.float32, True, 4)])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied, n_kv_heads):
    model = tiny_hf_model(tmp_path / "hf", dtype=dtype, tied=tied, n_kv_heads=n_kv_heads)
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    summary = convert_reversed(tmp_path / "model.ckpt", tmp_path / "back", tmp_path / "hf" / "config.json",
                               progress=None)
    original, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert set(back) == set(original) and summary["dropped"] == 0
    for name, tensor in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name].view(torch.int16 if dtype != torch.float32
                                                                          else torch.int32),
                                                         tensor.view(torch.int16 if dtype != torch.float32
                                                                     else torch.int32)), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["tie_word_embeddings"] is tied
    assert config["num_key_value_heads"] == n_kv_heads
    assert QwenConfig.from_hf_dir(tmp_path / "back") == QwenConfig.from_hf_dir(tmp_path / "hf")
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "back", torch_dtype=torch.float32).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_optimizer_state_is_dropped_and_counted(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    weights = {n: p for n, p in ms.load_checkpoint(str(tmp_path / "model.ckpt")).items() if n != CONFIG_ENTRY}
    entries = [{"name": n, "data": p} for n, p in weights.items()]
    for n, p in weights.items():
        entries += [{"name": f"adam_m.{n}", "data": p}, {"name": f"adam_v.{n}", "data": p}]
    entries += [{"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))},
                {"name": "learning_rate", "data": ms.Tensor(np.array(1e-5, np.float32))}]
    ms.save_checkpoint(entries, str(tmp_path / "trained.ckpt"))
    messages = []
    summary = convert_reversed(tmp_path / "trained.ckpt", tmp_path / "back", tmp_path / "hf", progress=messages.append)
    assert summary["dropped"] == 2 * len(weights) + 2
    assert f"dropped {2 * len(weights) + 2} optimizer/step entries" in messages[-1]
    assert set(_hf_tensors(tmp_path / "back")) == set(_hf_tensors(tmp_path / "hf"))


def test_large_models_are_sharded_with_an_index(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    summary = convert_reversed(tmp_path / "model.ckpt", tmp_path / "back", tmp_path / "hf", max_shard_bytes=20_000,
                               progress=None)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "back").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == summary["bytes"]
    original = _hf_tensors(tmp_path / "hf")
    assert all(torch.equal(t, original[n]) for n, t in _hf_tensors(tmp_path / "back").items())
    Qwen2ForCausalLM.from_pretrained(tmp_path / "back")


def test_config_is_inferred_for_published_sizes_only(tmp_path):
    shapes = {"model.tok_embeddings.embedding_weight": (151936, 1024),
              "model.layers.0.attention.wq.weight": (1024, 1024), "model.layers.0.attention.wq.bias": (1024,),
              "model.layers.0.attention.wk.weight": (1024, 1024), "model.layers.23.ffn_norm.weight": (1024,),
              "model.layers.0.feed_forward.w1.weight": (2816, 1024)}
    cfg = infer_config(shapes, "x.ckpt")
    assert (cfg.num_layers, cfg.num_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.tie_word_embeddings,
            cfg.qkv_has_bias) == (24, 16, 16, 2816, True, True)
    tiny_hf_model(tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    # a checkpoint convert_weight wrote carries its config.json: no --config, whatever the size
    summary = convert_reversed(tmp_path / "model.ckpt", tmp_path / "back", progress=None)
    assert summary["config"] == QwenConfig.from_hf_dir(tmp_path / "hf")
    bare = {n: p for n, p in ms.load_checkpoint(str(tmp_path / "model.ckpt")).items() if n != CONFIG_ENTRY}
    ms.save_checkpoint([{"name": n, "data": p} for n, p in bare.items()], str(tmp_path / "bare.ckpt"))
    with pytest.raises(UserError, match="hidden size 32 is not a published Qwen1.5 size"):
        convert_reversed(tmp_path / "bare.ckpt", tmp_path / "bare_back", progress=None)
    assert not (tmp_path / "bare_back").exists()


def test_mismatch_keeps_the_previous_directory_and_cli_reports_it(tmp_path):
    tiny_hf_model(tmp_path / "hf")
    tiny_hf_model(tmp_path / "other", n_kv_heads=4)
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", progress=None)
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "keep.txt").write_text("previous")
    run = subprocess.run([str(QWENBUILD), "convert_reversed", "--mindspore_ckpt_path", str(tmp_path / "model.ckpt"),
                          "--torch_ckpt_path", str(tmp_path / "back"), "--config", str(tmp_path / "other")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "wrong shape (8): model.layers.0.attention.wk.weight (16, 32) (expected (32, 32))" in run.stderr
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["keep.txt"]
    # a good conversion does not replace a directory holding the user's file either; it replaces its own output
    good = [str(QWENBUILD), "convert_reversed", "--mindspore_ckpt_path", str(tmp_path / "model.ckpt"),
            "--config", str(tmp_path / "hf"), "--torch_ckpt_path"]
    refused = subprocess.run(good + [str(tmp_path / "back")], capture_output=True, text=True)
    assert refused.returncode == 2 and "holds what qwenbuild did not write there (keep.txt)" in refused.stderr
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["keep.txt"]
    for _ in range(2):
        ok = subprocess.run(good + [str(tmp_path / "new")], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".qwenbuild-seal.json", "config.json",
                                                                   "model.safetensors"]
