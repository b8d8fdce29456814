"""Parameter names and shapes of the Qwen1.5 network, in MindFormers' LlamaForCausalLM naming, and the HF mapping."""

from __future__ import annotations

import re

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig

# (HF Qwen2 fragment, MindFormers fragment) inside model.layers.{i}.
_LAYER_NAMES = [
    ("self_attn.q_proj.", "attention.wq."),
    ("self_attn.k_proj.", "attention.wk."),
    ("self_attn.v_proj.", "attention.wv."),
    ("self_attn.o_proj.", "attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("input_layernorm.", "attention_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
]
# the vocabulary table: the input embedding, and the output projection too when tie_word_embeddings
EMBEDDING = "model.tok_embeddings.embedding_weight"
_TOP_NAMES = [
    ("model.embed_tokens.weight", EMBEDDING),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer index, name inside the layer) of a decoder-layer parameter, in HF or MindFormers naming; else None."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def _map(name: str, pairs_layer, pairs_top) -> str | None:
    for a, b in pairs_top:
        if name == a:
            return b
    layer = split_layer_name(name)
    if layer:
        index, rest = layer
        for a, b in pairs_layer:
            if rest.startswith(a):
                return f"model.layers.{index}.{b}{rest[len(a):]}"
    return None


def hf_to_ms(name: str) -> str | None:
    """MindFormers name of a Hugging Face Qwen2 parameter, or None when the name is not a Qwen1.5 parameter."""
    return _map(name, _LAYER_NAMES, _TOP_NAMES)


def ms_to_hf(name: str) -> str | None:
    """Hugging Face name of a MindFormers parameter, or None (optimizer state, step counters, ...)."""
    return _map(name, [(b, a) for a, b in _LAYER_NAMES], [(b, a) for a, b in _TOP_NAMES])


def layer_parameter_shapes(cfg: QwenConfig, i: int) -> dict[str, tuple[int, ...]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.n_kv_heads * hd
    p = f"model.layers.{i}."
    # MindFormers' own order (parameters_and_names), which is also the order checkpoints are written in
    shapes = {p + "ffn_norm.weight": (h,), p + "attention_norm.weight": (h,)}
    for proj, size in (("wq", q), ("wk", kv), ("wv", kv)):
        shapes[f"{p}attention.{proj}.weight"] = (size, h)
        if cfg.qkv_has_bias:
            shapes[f"{p}attention.{proj}.bias"] = (size,)
    shapes.update({
        p + "attention.wo.weight": (h, q),
        p + "feed_forward.w1.weight": (cfg.intermediate_size, h),
        p + "feed_forward.w2.weight": (h, cfg.intermediate_size),
        p + "feed_forward.w3.weight": (cfg.intermediate_size, h),
    })
    return shapes


def parameter_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter of the network, in MindFormers names, in network order.

    A tied model has no lm_head.weight: the output projection reuses the embedding table.
    """
    shapes = {EMBEDDING: (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        shapes.update(layer_parameter_shapes(cfg, i))
    shapes["model.norm_out.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def num_parameters(cfg: QwenConfig) -> int:
    total = 0
    for shape in parameter_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# the model's Hugging Face config.json, kept inside the checkpoints qwenbuild writes (a MindSpore string entry), so
# a checkpoint converts back without being told the model's dimensions
CONFIG_ENTRY = "hf_config_json"
# a LoRA run's adapter settings (rank, alpha, dropout, targets) as JSON, in the checkpoints that hold its adapters
LORA_ENTRY = "lora_config_json"
# optimizer and loss-scale state that MindSpore training checkpoints carry next to the weights
_TRAINING_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "accum_grad.", "global_step",
                      "learning_rate", "beta1_power", "beta2_power", "scale_sense", "loss_scale", "epoch_num",
                      "step_num", "current_iterator_step", "last_overflow_iterator_step", "global_batch_size")


# the KV cache of the exported graphs: per layer, MindFormers r1.0's KVCacheMgr state
CACHE_NAMES = ("key_past", "value_past")


def cache_name(layer: int, which: str) -> str:
    return f"model.layers.{layer}.attention.kvcache_mgr.{which}"


def is_cache_name(name: str) -> bool:
    return ".attention.kvcache_mgr." in name


def is_beside_weights(name: str) -> bool:
    """True for optimizer/step-counter entries and the stored config: what a checkpoint holds besides weights."""
    return name in (CONFIG_ENTRY, LORA_ENTRY) or name.startswith(_TRAINING_PREFIXES)


def check_names(expected: dict, found: dict, source) -> None:
    """Raise a UserError listing missing, unexpected and mis-shaped tensors (expected/found: name -> shape)."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} {tuple(found[n])} (expected {tuple(expected[n])})"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = []
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
            problems.append(f"{title} ({len(names)}): {shown}")
    if problems:
        raise UserError(f"{source} does not match the model configuration:\n  " + "\n  ".join(problems),
                        hint="check that config.json (or the model section) describes this checkpoint")
