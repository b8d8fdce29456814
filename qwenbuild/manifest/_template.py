"""The commented qwen.toml that `qwenbuild init` writes; the embedded default is the `tiny` rendering."""

from __future__ import annotations

from qwenbuild.manifest._presets import MODELS, PLANS

# training settings a new manifest starts from, per preset family
_TINY_TRAIN = dict(learning_rate=3e-3, warmup_ratio=0.05, weight_decay=0.01, epochs=1, steps=600, batch_size=32,
                   save_steps=200)
_LARGE_TRAIN = dict(learning_rate=1e-6, warmup_ratio=0.01, weight_decay=0.01, epochs=5, steps=None, batch_size=2,
                    save_steps=400)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        text = repr(value)
        return text if ("e" in text or "." in text) else text + ".0"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def render(preset: str) -> str:
    dims = MODELS[preset]
    nodes, per_node, dp, mp, pp, micro, seq = PLANS[preset]
    tiny = preset == "tiny"
    train = _TINY_TRAIN if tiny else _LARGE_TRAIN
    lines = [
        "# qwen.toml: everything qwenbuild builds is described here. Reference: README.md, \"qwen.toml reference\".",
        "# Check it with `qwenbuild validate`, see the plan with `qwenbuild plan`, build with `doit finetune`.",
        "",
        "[model]",
        f"preset = {_toml(preset)}  # real dimensions of a Qwen1.5 size; `qwenbuild init --help` lists them",
    ]
    if tiny:
        lines += ["init = \"random\"  # starting weights drawn from init_seed; \"hf\" converts hf_dir instead",
                  "init_seed = 0",
                  f"init_std = {round(dims['hidden_size'] ** -0.5, 3)}  # 1/sqrt(hidden_size); at 0.02 (Qwen1.5's) a "
                  "model this narrow starts learning late and erratically",
                  "# hf_dir = \"path/to/Qwen1.5-7B\"  # with init = \"hf\": the checkpoint to convert (and its dimensions)"]
    else:
        lines += [f"hf_dir = \"models/Qwen1.5-{preset.split('-')[1].upper()}\"  # Hugging Face checkpoint to convert"]
    lines += [f"# hidden_size = {dims['hidden_size']}, num_layers = {dims['num_layers']}, "
              f"num_heads = {dims['num_heads']}, n_kv_heads = {dims['n_kv_heads']}  # override the preset here",
              f"param_dtype = {_toml(dims['param_dtype'])}  # weights as stored and converted",
              f"compute_dtype = {_toml(dims['compute_dtype'])}  # matmul dtype on Ascend; CPU computes in float32",
              "",
              "[tokenizer]"]
    if tiny:
        lines += ["kind = \"trained\"  # small BPE in the Qwen format, trained on the dataset: a tiny model's softmax",
                  "                  # over the real 151,646-token vocabulary would dominate CPU training",
                  "vocab_size = 505  # all this dataset supports: every letter, digit and Chinese numeral is one token"]
    else:
        lines += ["kind = \"qwen\"  # the real Qwen1.5 vocabulary, built offline"]
    lines += ["",
              "[dataset]"]
    if tiny:
        lines += ["source = \"builtin\"  # the project's own instruction dataset (English and Chinese)",
                  "num_train = 4000",
                  "num_heldout = 200"]
    else:
        lines += ["source = \"alpaca\"",
                  "path = \"data/alpaca_data.json\"  # alpaca JSON array or JSON Lines"]
    lines += [f"seq_length = {seq}  # the one place the training length is set; MindRecord rows hold seq_length + 1",
              f"mask_prompt = {_toml(tiny)}  # true: train on assistant replies only",
              "",
              "[hardware]",
              f"device = {_toml('cpu' if tiny else 'ascend')}",
              f"devices_per_node = {per_node}" + ("  # CPU worker processes started by msrun" if tiny else ""),
              f"device_memory_gb = {8 if tiny else 64}",
              "master_port = 8118"]
    if not tiny:
        lines += ["# python = \"python3\"  # the Python on every node: a name on its PATH, or an absolute path there",
                  "# env_script = \"/usr/local/Ascend/ascend-toolkit/set_env.sh\"  # sourced on every node first"]
    for n in range(nodes):
        lines += ["", "[[hardware.nodes]]"]
        if tiny:
            lines += ["host = \"localhost\"", "ip = \"127.0.0.1\""]
        else:
            lines += [f"host = \"node{n}\"", f"ip = \"192.168.1.{n + 1}\"",
                      "# device_ips = [...]  # this node's NPU IPs, or: rank_table = \"hccl_....json\" that "
                      "`qwenbuild hccl_tools` wrote on it"]
    lines += ["",
              "[parallel]",
              f"data_parallel = {dp}",
              f"model_parallel = {mp}",
              f"pipeline_stage = {pp}",
              f"micro_batch_num = {micro}",
              "vocab_emb_dp = true",
              "gradient_aggregation_group = 4",
              f"use_seq_parallel = {_toml(not tiny)}",
              f"recompute = {_toml(not tiny)}",
              "",
              "[train]",
              f"learning_rate = {_toml(train['learning_rate'])}",
              f"warmup_ratio = {_toml(train['warmup_ratio'])}",
              f"weight_decay = {_toml(train['weight_decay'])}"]
    if train["steps"]:
        lines += [f"steps = {train['steps']}  # overrides epochs"]
    else:
        lines += [f"epochs = {train['epochs']}"]
    lines += [f"batch_size = {train['batch_size']}  # per data-parallel rank and micro batch",
              "seed = 42",
              f"save_steps = {train['save_steps']}",
              "",
              "[export]",
              "checkpoint = \"finetuned\"  # or \"converted\": export the weights before finetuning",
              f"seq_length = {128 if tiny else 8192}",
              "batch_size = 1",
              f"model_parallel = {2 if tiny else 4}  # tensor-parallel ranks of the graphs, on one node",
              "use_past = true  # also export the incremental (decode) graph",
              "",
              "[lite]",
              "# [lite.ge_session_options] overrides keys of lite.ini, e.g. \"ge.externalWeight\" = 0",
              "",
              "[build]",
              "dir = \"build\"",
              ""]
    return "\n".join(lines)
