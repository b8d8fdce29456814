"""Tiny random Qwen1.5-architecture models written by transformers itself, for tests."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_hf_model(out_dir, *, n_kv_heads=2, tied=False, seed=0, dtype=torch.float32, vocab=96, hidden=32,
                  layers=2, heads=4, intermediate=64, rope_theta=10000.0, max_shard_size=None, max_positions=256):
    """Save a random Qwen2ForCausalLM with random biases and RMSNorm weights; returns the float32 torch model."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=n_kv_heads, intermediate_size=intermediate, rope_theta=rope_theta,
                         rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=max_positions)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, **kwargs)
    # reloaded rather than cast back: casting would also round the rotary inv_freq buffer
    return Qwen2ForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
