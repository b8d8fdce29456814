"""Writes schemas/qwen.schema.json; the schema is data, this script only keeps its repetition in one place."""

import json
from pathlib import Path

PRESETS = ["tiny", "qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-4b", "qwen1.5-7b", "qwen1.5-14b", "qwen1.5-32b",
           "qwen1.5-72b"]
DTYPES = ["float32", "bfloat16", "float16"]


def integer(desc, minimum=1, default=None, maximum=None):
    s = {"type": "integer", "minimum": minimum, "description": desc}
    if maximum is not None:
        s["maximum"] = maximum
    if default is not None:
        s["default"] = default
    return s


def number(desc, exclusive_minimum=0, default=None, maximum=None):
    s = {"type": "number", "exclusiveMinimum": exclusive_minimum, "description": desc}
    if maximum is not None:
        s["maximum"] = maximum
    if default is not None:
        s["default"] = default
    return s


def boolean(desc, default):
    return {"type": "boolean", "default": default, "description": desc}


def string(desc, default=None, enum=None, min_length=1):
    s = {"type": "string", "description": desc}
    if min_length:
        s["minLength"] = min_length
    if enum:
        s["enum"] = enum
    if default is not None:
        s["default"] = default
    return s


def section(desc, props, required=()):
    return {"type": "object", "description": desc, "additionalProperties": False, "properties": props,
            "required": list(required), "default": {}}


ipv4 = {"type": "string", "format": "ipv4", "description": "an IPv4 address"}

schema = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://qwenbuild.dev/schemas/qwen.schema.json",
    "title": "qwen.toml",
    "description": "The qwenbuild manifest: model, tokenizer, dataset, hardware, parallel plan, training, export.",
    "type": "object",
    "additionalProperties": False,
    "required": ["model", "dataset", "hardware", "parallel", "train", "export"],
    "properties": {
        "model": section("The Qwen1.5 network. Dimensions come from `hf_dir`'s config.json when set, else from "
                         "`preset`; explicit keys override a preset and must agree with `hf_dir`.", {
            "preset": string("named Qwen1.5 size whose real dimensions are used", enum=PRESETS),
            "hf_dir": string("Hugging Face Qwen1.5 checkpoint directory (config.json + safetensors or "
                             "pytorch_model*.bin) to convert; relative to qwen.toml"),
            "init_seed": integer("seed of the random starting weights built when `hf_dir` is not set", 0, 0),
            "hidden_size": integer("width of the residual stream"),
            "num_layers": integer("number of decoder layers"),
            "num_heads": integer("attention (query) heads"),
            "n_kv_heads": integer("key/value heads (GQA when fewer than num_heads)"),
            "intermediate_size": integer("SwiGLU inner width"),
            "vocab_size": integer("embedding rows (at least the tokenizer's length)"),
            "rms_norm_eps": number("RMSNorm epsilon", maximum=0.1),
            "rope_theta": number("RoPE base"),
            "max_position_embeddings": integer("longest sequence the model supports"),
            "qkv_has_bias": boolean("q/k/v projections carry a bias (true for every Qwen1.5)", True),
            "tie_word_embeddings": boolean("lm_head reuses the embedding table", False),
            "param_dtype": string("dtype of stored parameters and of the converted checkpoint", enum=DTYPES),
            "compute_dtype": string("dtype of matmuls on Ascend (CPU computes in float32)", enum=DTYPES),
        }),
        "tokenizer": section("Which tokenizer files (vocab.json, merges.txt) the data and inference use.", {
            "kind": string("`qwen`: the real Qwen1.5 vocabulary built offline; `trained`: a small byte-level BPE "
                           "in the same format trained on the dataset; `hf`: vocab.json/merges.txt of `dir`",
                           "qwen", enum=["qwen", "trained", "hf"]),
            "vocab_size": integer("total size of a `trained` tokenizer, special tokens included", 259, 1024),
            "dir": string("directory holding vocab.json and merges.txt (kind = \"hf\"); defaults to model.hf_dir"),
        }),
        "dataset": section("Instruction data: alpaca JSON/JSONL -> ChatML -> MindRecord.", {
            "source": string("`builtin`: the project's own generated instruction dataset; `alpaca`: the file at "
                             "`path`", "builtin", enum=["builtin", "alpaca"]),
            "path": string("alpaca-format JSON array or JSON Lines file (source = \"alpaca\"); relative to qwen.toml"),
            "seq_length": integer("training sequence length; MindRecord rows hold seq_length + 1 tokens", 8, 2048),
            "num_train": integer("rows of the builtin dataset used for training", 1, 4000),
            "num_heldout": integer("held-out rows of the builtin dataset used for evaluation", 0, 200),
            "seed": integer("seed of the builtin dataset", 0, 0),
            "mask_prompt": boolean("train only on assistant replies (system and user turns get -100)", False),
            "skip_bad_rows": boolean("skip malformed alpaca rows instead of stopping", False),
            "file_partition": integer("MindRecord shard files", 1, 1, 64),
        }, required=["seq_length"]),
        "hardware": section("The machines: nodes, devices per node, device kind and memory.", {
            "device": string("device kind", "ascend", enum=["ascend", "cpu"]),
            "devices_per_node": integer("devices (NPUs, or CPU worker processes) per node", 1, 8, 64),
            "device_memory_gb": number("memory of one device in GiB (host RAM share for cpu)", default=64),
            "device_ip_source": string("where device IPs come from when a node lists none: `hccn_tool` "
                                       "(hccn_tool -i N -ip -g, then /etc/hccn.conf) or `hccn_conf` only",
                                       "hccn_tool", enum=["hccn_tool", "hccn_conf"]),
            "master_port": integer("msrun master port", 1024, 8118, 65535),
            "nodes": {
                "type": "array", "minItems": 1, "description": "one entry per node, in rank order",
                "items": {
                    "type": "object", "additionalProperties": False, "required": ["host", "ip"],
                    "properties": {
                        "host": string("host name"),
                        "ip": ipv4 | {"description": "node IP (rank table server_id; node 0 is the msrun master)"},
                        "device_ids": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                       "description": "physical device ids used on this node (default 0..n-1)"},
                        "device_ips": {"type": "array", "items": ipv4,
                                       "description": "NPU IPs in device order (default: discovered)"},
                    },
                },
            },
        }, required=["nodes"]),
        "parallel": section("The parallel plan; data_parallel x model_parallel x pipeline_stage = device count.", {
            "data_parallel": integer("data-parallel degree", 1, 1),
            "model_parallel": integer("tensor (model) parallel degree", 1, 1),
            "pipeline_stage": integer("pipeline stages", 1, 1),
            "micro_batch_num": integer("micro batches per step (pipeline)", 1, 1),
            "vocab_emb_dp": boolean("keep embedding and lm_head unsplit by model_parallel", True),
            "gradient_aggregation_group": integer("gradient fusion group size", 1, 4),
            "use_seq_parallel": boolean("sequence parallel (Ascend)", False),
            "recompute": boolean("recompute activations in backward (Ascend)", True),
            "offset": {"type": "array", "items": {"type": "integer"},
                       "description": "extra layers per pipeline stage when num_layers is not a multiple of "
                                      "pipeline_stage (MindFormers' model_config.offset); adds up to the remainder"},
            "strategy_dir": string("strategy files compiled on Ascend (only_save_strategy); used instead of the "
                                   "synthesised ones; relative to qwen.toml"),
        }),
        "train": section("Finetuning settings.", {
            "learning_rate": number("peak learning rate", default=1e-5),
            "warmup_ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.01,
                             "description": "fraction of steps with linear warmup (then cosine decay)"},
            "weight_decay": {"type": "number", "minimum": 0, "default": 0.01,
                             "description": "decoupled AdamW weight decay"},
            "beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.9,
                      "description": "AdamW beta1"},
            "beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.95,
                      "description": "AdamW beta2"},
            "eps": number("AdamW epsilon", default=1e-8),
            "grad_clip": number("clip gradients to this global norm", default=1.0),
            "epochs": integer("passes over the data (ignored when steps is set)", 1, 1),
            "steps": integer("optimizer steps; overrides epochs"),
            "batch_size": integer("sequences per data-parallel rank per micro batch (runner_config.batch_size)",
                                  1, 1),
            "seed": integer("training seed", 0, 42),
            "save_steps": integer("checkpoint every N steps (and at the end)", 1, 100),
            "eval_max_new_tokens": integer("answer length limit of held-out evaluation", 1, 32),
        }),
        "export": section("MINDIR export and inference.", {
            "checkpoint": string("weights to export", "finetuned", enum=["finetuned", "converted"]),
            "seq_length": integer("exported sequence length (prompt + answer)", 8, 1024),
            "batch_size": integer("exported batch size", 1, 1),
            "use_past": boolean("also export the incremental (decode, KV cache) graph", True),
            "predict_data": string("prompt of the `infer` task", "帮助我制定一份去上海的旅游攻略"),
            "max_new_tokens": integer("answer length of the `infer` task", 1, 32),
        }),
        "lite": section("MindSpore Lite lite.ini: extra or overriding keys, by ini section.", {
            "ascend_context": {"type": "object", "default": {}, "description": "[ascend_context] keys",
                               "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
            "ge_session_options": {"type": "object", "default": {}, "description": "[ge_session_options] keys",
                                   "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
            "ge_graph_options": {"type": "object", "default": {}, "description": "[ge_graph_options] keys",
                                 "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
        }),
        "build": section("Where artifacts go.", {
            "dir": string("build directory, relative to qwen.toml", "build"),
        }),
    },
}

out = Path(__file__).resolve().parents[1] / "schemas" / "qwen.schema.json"
out.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
print(f"wrote {out}")
