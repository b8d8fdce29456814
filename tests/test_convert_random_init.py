"""write_random_hf_model: a seeded Qwen1.5 checkpoint, identical bytes on every run, loadable by transformers."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from qwenbuild.model.config import QwenConfig
from qwenbuild.model.params import ms_to_hf, parameter_shapes
from qwenbuild.digests import file_digest
from qwenbuild.weights import write_random_hf_model

CFG = QwenConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=96,
                 rope_theta=10000.0, max_position_embeddings=512)


def test_same_seed_same_bytes_other_seed_other_values(tmp_path):
    a, b = write_random_hf_model(CFG, 7, tmp_path / "a"), write_random_hf_model(CFG, 7, tmp_path / "b")
    c = write_random_hf_model(CFG, 8, tmp_path / "c")
    assert sorted(p.name for p in a.iterdir()) == [".qwenbuild-seal.json", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert file_digest(a / name) == file_digest(b / name)
    assert file_digest(a / "model.safetensors") != file_digest(c / "model.safetensors")


def test_values_shapes_and_config(tmp_path):
    out = write_random_hf_model(CFG, 0, tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    shapes = {ms_to_hf(n): s for n, s in parameter_shapes(CFG).items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64))
    embed = tensors["model.embed_tokens.weight"].numpy()
    assert abs(embed.std() - 0.02) < 0.002 and abs(embed.mean()) < 0.002
    assert tensors["model.layers.1.self_attn.k_proj.bias"].abs().max() > 0
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(CFG.to_hf_dict()))
    assert QwenConfig.from_hf_dir(out) == CFG
    model = Qwen2ForCausalLM.from_pretrained(out)
    assert model.config.rope_theta == 10000.0 and model.lm_head.weight.shape == (128, 64)


def test_bfloat16_model(tmp_path):
    cfg = QwenConfig(**{**CFG.__dict__, "param_dtype": "bfloat16", "tie_word_embeddings": True})
    out = write_random_hf_model(cfg, 0, tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and "lm_head.weight" not in tensors
    f32 = write_random_hf_model(CFG, 0, tmp_path / "f")
    # same draws, rounded to bfloat16
    reference = load_file(f32 / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], reference)
    assert np.isclose(float(tensors["model.embed_tokens.weight"].float().std()), 0.02, atol=0.002)


def test_init_std_scales_the_same_draws(tmp_path):
    default = load_file(write_random_hf_model(CFG, 3, tmp_path / "a") / "model.safetensors")
    wide = load_file(write_random_hf_model(CFG, 3, tmp_path / "b", std=0.125) / "model.safetensors")
    for name, tensor in default.items():
        if name.endswith("norm.weight"):
            assert torch.equal(wide[name], torch.ones_like(tensor))
        else:  # 0.125 / 0.02: the same standard normal draws, 6.25 times as wide
            torch.testing.assert_close(wide[name], tensor * 6.25, rtol=1e-6, atol=0)
    assert abs(float(wide["model.embed_tokens.weight"].std()) - 0.125) < 0.0125
