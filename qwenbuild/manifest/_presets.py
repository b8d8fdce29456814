"""Real dimensions of every Qwen1.5 size (from their config.json) and the tiny default, with a starting plan each."""

from __future__ import annotations

_QWEN = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, qkv_has_bias=True,
             tie_word_embeddings=False, param_dtype="bfloat16", compute_dtype="bfloat16")

MODELS: dict[str, dict] = {
    "tiny": dict(_QWEN, hidden_size=128, num_layers=4, num_heads=4, n_kv_heads=2, intermediate_size=352,
                 vocab_size=512, max_position_embeddings=512, rope_theta=10_000.0, param_dtype="float32",
                 compute_dtype="float32"),
    "qwen1.5-0.5b": dict(_QWEN, hidden_size=1024, num_layers=24, num_heads=16, n_kv_heads=16,
                         intermediate_size=2816, vocab_size=151936, tie_word_embeddings=True),
    "qwen1.5-1.8b": dict(_QWEN, hidden_size=2048, num_layers=24, num_heads=16, n_kv_heads=16,
                         intermediate_size=5504, vocab_size=151936),
    "qwen1.5-4b": dict(_QWEN, hidden_size=2560, num_layers=40, num_heads=20, n_kv_heads=20,
                       intermediate_size=6912, vocab_size=151936, rope_theta=5_000_000.0),
    "qwen1.5-7b": dict(_QWEN, hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=32,
                       intermediate_size=11008, vocab_size=151936),
    "qwen1.5-14b": dict(_QWEN, hidden_size=5120, num_layers=40, num_heads=40, n_kv_heads=40,
                        intermediate_size=13696, vocab_size=152064),
    "qwen1.5-32b": dict(_QWEN, hidden_size=5120, num_layers=64, num_heads=40, n_kv_heads=8,
                        intermediate_size=27392, vocab_size=152064),
    "qwen1.5-72b": dict(_QWEN, hidden_size=8192, num_layers=80, num_heads=64, n_kv_heads=64,
                        intermediate_size=24576, vocab_size=152064),
}

# (nodes, devices per node, dp, mp, pp, micro_batch_num, seq_length) a new manifest starts from
PLANS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (1, 2, 2, 1, 1, 1, 40),
    "qwen1.5-0.5b": (1, 8, 8, 1, 1, 1, 4096),
    "qwen1.5-1.8b": (1, 8, 4, 2, 1, 1, 4096),
    "qwen1.5-4b": (1, 8, 2, 4, 1, 1, 4096),
    "qwen1.5-7b": (1, 8, 2, 4, 1, 1, 4096),
    "qwen1.5-14b": (1, 8, 1, 4, 2, 8, 4096),
    "qwen1.5-32b": (2, 8, 1, 8, 2, 16, 4096),
    "qwen1.5-72b": (4, 8, 1, 8, 4, 48, 2048),
}

DIMENSION_KEYS = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
                  "rms_norm_eps", "rope_theta", "max_position_embeddings", "qkv_has_bias", "tie_word_embeddings")
