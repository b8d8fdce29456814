"""Every subcommand fed bad input: a clear message naming the culprit, a non-zero exit, no traceback, nothing
half-written and nothing the user had destroyed. One row per case: argv, exit code, a phrase of the message."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwenbuild.cli import COMMANDS

SENTINEL = b"the user's earlier output\n"
ROW = {"instruction": "Größe prüfen", "input": "", "output": "ça va"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _manifests(good: str) -> dict[str, bytes]:
    def sub(pattern, new):
        changed, n = re.subn(pattern, new, good, count=1, flags=re.M)
        assert n == 1, pattern
        return changed.encode()

    seq = r"^seq_length = \d+(?=  # the one place)"
    return {
        "good.toml": good.encode(),
        "empty.toml": b"",
        "trunc.toml": good[: good.index("[hardware]") + 6].encode(),
        "latin1.toml": sub(r"^# qwen.toml", "# qwen.toml für").decode().encode("latin-1"),
        "utf16.toml": good.encode("utf-16"),
        "badutf8.toml": good.encode() + b"\n# \xff\xfe\n",
        "wrongtype.toml": sub(seq, 'seq_length = "long"'),
        "tableastype.toml": sub(r"^\[model\]$", "model = 5\n[model_]"),
        "negative.toml": sub(r"^num_train = \d+", "num_train = -5"),
        "zero.toml": sub(seq, "seq_length = 0"),
        "huge.toml": sub(seq, "seq_length = 1000000000000"),
        "hugedevices.toml": sub(r"^devices_per_node = \d+", "devices_per_node = 1000000000000"),
        "float.toml": sub(r"^num_train = \d+", "num_train = 4000.5"),
        "missingkey.toml": sub(r"^\[train\]$", "[train_]"),
        "nonascii.toml": sub(r"^\[model\]$", "[模型]"),
        "dupkey.toml": sub(r"^num_train = \d+", "num_train = 4000\nnum_train = 10"),
        "nan.toml": sub(r"^learning_rate = \S+", "learning_rate = nan"),
        "floatdp.toml": sub(r"^data_parallel = \d+", "data_parallel = 2.0"),
        "smallbatch.toml": sub(r"^num_train = \d+", "num_train = 10"),
        "blankprompt.toml": sub(r"^use_past = true", 'use_past = true\npredict_data = "   "'),
        "compiledstrategy.toml": sub(r"^recompute = false",
                                     'recompute = false\nstrategy_dir = "build/output/strategy"'),
    }


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _build_corpus(c: Path) -> None:
    from qwenbuild.manifest._template import manifest_text
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.random_init import write_random_hf_model

    cfg = QwenConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, n_kv_heads=1, intermediate_size=32)
    write_random_hf_model(cfg, 0, c / "hf")
    subprocess.run([sys.executable, "-m", "qwenbuild", "convert_weight", "--torch_ckpt_dir", "hf",
                    "--mindspore_ckpt_path", "ms.ckpt"], cwd=c, check=True, capture_output=True)
    ckpt, st = (c / "ms.ckpt").read_bytes(), (c / "hf" / "model.safetensors").read_bytes()
    hf_cfg = (c / "hf" / "config.json").read_text()
    files = {
        "file.txt": "a regular file, not a directory\n",
        "empty": b"",
        "alpaca.json": json.dumps([{"instruction": f"Repeat {w}", "input": "", "output": w}
                                   for w in ("one", "two", "three", "你好")], ensure_ascii=False),
        "trunc.json": '[{"instruction": "say hi", "input": "", "out',
        "obj.json": '{"instruction": "a dict, not rows"}',
        "numbers.json": "[1, 2, 3]",
        "wrongtype.json": '[{"instruction": 5, "input": [], "output": null}]',
        "latin1.json": json.dumps([ROW], ensure_ascii=False).encode("latin-1"),
        "utf16.json": json.dumps([ROW], ensure_ascii=False).encode("utf-16"),
        "badutf8.json": b'[{"instruction": "\xff\xfe\xc3", "input": "", "output": "x"}]',
        "chat.jsonl": json.dumps(CHAT) + "\n",
        "chat_trunc.jsonl": json.dumps(CHAT)[:30],
        "chat_wrongtype.jsonl": json.dumps({"messages": "hi"}) + "\n",
        "chat_numbers.jsonl": "[1, 2]\n",
        "chat_latin1.jsonl": json.dumps(CHAT).replace("hi", "prüfen").encode("latin-1") + b"\n",
        "chat_utf16.jsonl": (json.dumps(CHAT) + "\n").encode("utf-16"),
        "vocab_list.json": "[1, 2, 3]",
        "vocab_trunc.json": '{"a": 0, "b',
        "tiktoken_garbage": "this is not base64 rank\n\xff\n",
        "tiktoken_latin1": "YQ== 0\nYg== zero\n".encode("latin-1"),
        "rt_list.json": "[]",
        "rt_noservers.json": '{"server_list": []}',
        "rt_wrongtype.json": '{"server_list": [{"server_id": "10.0.0.1", "device": "all"}]}',
        "rt_trunc.json": '{"server_list": [{"server_id": "10.',
        "rt_utf16.json": '{"server_list": []}'.encode("utf-16"),
        "rt_node.json": json.dumps({"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
            {"server_id": "10.0.0.1", "host_nic_ip": "reserve",
             "device": [{"device_id": "0", "device_ip": "192.168.1.1", "rank_id": "0"}]}]}),
        "hccn_badip2.conf": "netdetect_0=1.2.3.4\naddress_0=10.0.0.x\n",
        "deep.json": "[" * 100000 + "]" * 100000,
        "pretty_obj.json": json.dumps(ROW, indent=2, ensure_ascii=False),
        "chat_long_prompt.jsonl": json.dumps({"messages": [{"role": "user", "content": "tell me " * 40},
                                                           {"role": "assistant", "content": "ok"}]}) + "\n",
        "chat_long.jsonl": "".join(json.dumps({"messages": [{"role": "user", "content": "hi " * (i + 20)},
                                                            {"role": "assistant", "content": "hello"}]}) + "\n"
                                   for i in range(6)),
        "hccn_empty.conf": "",
        "hccn_badip.conf": "address_0=999.1.2.3\n",
        "hccn_latin1.conf": "address_0=ü\n".encode("latin-1"),
        "trunc.ckpt": ckpt[: len(ckpt) // 2],
        "garbage.ckpt": b"\x00\xff" * 100,
        "empty.ckpt": b"",
        "src_trunc/rank_0/checkpoint_0.ckpt": ckpt[:100],
        "strategy_garbage.ckpt": b"not a strategy protobuf",
        "strategy_dir/ckpt_strategy_rank_0.json": "{not json",
        "strategy_empty_dir/.keep": "",
        "mindir_empty/.keep": "",
        "mindir_badjson/mindir_full_checkpoint/rank_0_graph.json": "{trunc",
        "mindir_badjson/mindir_inc_checkpoint/rank_0_graph.json": "{trunc",
        "mindir_badjson/mindir_full_checkpoint/rank_0_graph.mindir": b"\x00garbage",
        "mindir_badjson/mindir_inc_checkpoint/rank_0_graph.mindir": b"\x00garbage",
        "dir/.keep": "",
        "vocab_dup.json": '{"a": 0, "b": 0}',
        "vocab_negative.json": '{"a": -1, "b": 0}',
        "merges_empty.txt": "",
        "tiktoken_duprank": "YQ== 0\nYg== 0\n",
        "tiktoken_duptoken": "YQ== 0\nYQ== 1\n",
        "longint.json": '[{"instruction": "x", "input": "", "output": "y", "n": ' + "7" * 5000 + "}]",
        "rt_iplist.json": json.dumps({"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
            {"server_id": "10.0.0.1", "device": [{"device_id": "0", "device_ip": ["192.168.1.1"], "rank_id": "0"}]}]}),
        "rt_longint.json": '{"server_list": [{"server_id": ' + "1" * 5000 + "}]}",
        "hf_escape/config.json": hf_cfg,
        "hf_escape/model.safetensors.index.json": json.dumps({"weight_map": {"model.norm.weight":
                                                                             "../hf/model.safetensors"}}),
        "hf_absolute/config.json": hf_cfg,
        "hf_absolute/model.safetensors.index.json": json.dumps({"weight_map": {"model.norm.weight":
                                                                               str(c / "hf" / "model.safetensors")}}),
    }
    hf_doc = json.loads(hf_cfg)
    cfgs = {"hf_emptycfg": "", "hf_trunccfg": hf_cfg[: len(hf_cfg) // 2],
            # config.json read by qwen.toml's rules: finite numbers, bounds, types, the Qwen2 family
            "hf_nancfg": json.dumps({**hf_doc, "rms_norm_eps": float("nan")}),
            "hf_infcfg": json.dumps({**hf_doc, "rope_theta": float("inf")}),
            "hf_negthetacfg": json.dumps({**hf_doc, "rope_theta": -5}),
            "hf_strthetacfg": json.dumps({**hf_doc, "rope_theta": "abc"}),
            "hf_llamacfg": json.dumps({**hf_doc, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
            "hf_tiedcfg": json.dumps({**hf_doc, "tie_word_embeddings": True}),
            "hf_longintcfg": hf_cfg.replace('"hidden_size": 16', '"hidden_size": ' + "1" * 5000),
            "hf_wrongcfg": hf_cfg.replace('"hidden_size": 16', '"hidden_size": "sixteen"'),
            "hf_listcfg": "[16, 2]",
            "hf_zerocfg": hf_cfg.replace('"num_attention_heads": 2', '"num_attention_heads": 0'),
            "hf_negcfg": hf_cfg.replace('"vocab_size": 64', '"vocab_size": -64'),
            "hf_utf16cfg": hf_cfg.encode("utf-16"), "hf_latin1cfg": hf_cfg.replace("{", '{"note": "ü",', 1).encode(
                "latin-1")}
    for name, text in cfgs.items():
        files[f"{name}/config.json"], files[f"{name}/model.safetensors"] = text, st
    weights = {"hf_truncst": st[: len(st) // 2], "hf_emptyst": b"", "hf_garbagest": b"\xff" * 64,
               "hf_hugeheader": (10**15).to_bytes(8, "little") + b"{}"}
    for name, blob in weights.items():
        files[f"{name}/config.json"], files[f"{name}/model.safetensors"] = hf_cfg, blob
    files["hf_noweights/config.json"] = hf_cfg
    run = {"model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                     "n_kv_heads": 1, "intermediate_size": 32},
           "train_data": "data.mindrecord", "output_dir": "out", "seq_length": 8, "batch_size": 1,
           "learning_rate": 0.001}
    files.update({"run_unknown.json": json.dumps({**run, "lerning_rate": 1}),
                  "run_zero.json": json.dumps({**run, "batch_size": 0}),
                  "run_beta.json": json.dumps({**run, "beta1": "high"}),
                  "run_model.json": json.dumps({**run, "model": {**run["model"], "num_heads": 0}}),
                  "run_modeltype.json": json.dumps({**run, "model": 5})})
    files["hf_cfgdir/config.json/.keep"] = ""
    _two_rank_models(c)
    for name, data in _manifests(manifest_text("tiny")).items():
        files[f"m/{name}"] = data
    for name, hf_dir in (("hfnan.toml", "../hf_nancfg"), ("hffile.toml", "../file.txt"),
                         ("hfllama.toml", "../hf_llamacfg")):
        files[f"m/{name}"] = manifest_text("tiny").replace('init = "random"', f'hf_dir = "{hf_dir}"', 1)
    for name, data in files.items():
        _write(c / name, data)
    (c / "hf_stdir").mkdir()
    (c / "hf_stdir" / "config.json").write_text(hf_cfg)
    (c / "hf_stdir" / "model.safetensors").mkdir()
    (c / "tiktoken_empty").write_bytes(b"")
    for argv in (["tokenizer", "--output_dir", "tok", "--train_from", "alpaca.json", "--vocab_size", "280"],
                 ["strategy", "--model_dir", "hf", "--data_parallel", "2", "--output_dir", "strategy"],
                 ["strategy", "--model_dir", "hf2", "--model_parallel", "2", "--output_dir", "strategy_mp2"],
                 ["strategy", "--model_dir", "hf2", "--pipeline_stage", "2", "--output_dir", "strategy_pp2"],
                 ["strategy", "--model_dir", "hf3", "--model_parallel", "2", "--output_dir", "strategy_other"],
                 ["convert_weight", "--torch_ckpt_dir", "hf2", "--mindspore_ckpt_path", "ms2.ckpt"],
                 ["transform_ckpt", "--src_ckpt_dir", "ms2.ckpt", "--dst_ckpt_strategy", "strategy_mp2",
                  "--dst_ckpt_dir", "shards_mp2"]):
        subprocess.run([sys.executable, "-m", "qwenbuild", *argv], cwd=c, check=True, capture_output=True)
    # rank 1's directory holding rank 0's shard
    shutil.copytree(c / "shards_mp2", c / "shards_dup")
    (c / "shards_dup" / "rank_1" / "checkpoint_1.ckpt").write_bytes(
        (c / "shards_dup" / "rank_0" / "checkpoint_0.ckpt").read_bytes())


def _two_rank_models(c: Path) -> None:
    """Two small models whose KV heads split over 2 ranks: hf2 (2 layers) and hf3 (3 layers, another model)."""
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights.random_init import write_random_hf_model

    for name, layers in (("hf2", 2), ("hf3", 3)):
        write_random_hf_model(QwenConfig(vocab_size=64, hidden_size=16, num_layers=layers, num_heads=2, n_kv_heads=2,
                                         intermediate_size=32), 1, c / name)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    c = tmp_path_factory.mktemp("corpus")
    _build_corpus(c)
    return c


# (argv after `qwenbuild`, exit code, phrase the message must contain, output path that pre-exists and must survive)
# {c} is the corpus directory; outputs are relative to the test's own empty working directory. What pre-exists:
# "out.json" a file of the user's; "x.jsonl<alpaca.json" a copy of a corpus file or directory; "link->target" a
# symbolic link to a user's file (to itself: a loop); "name=>path" a hard link of a file made before it; "dir/" a
# directory holding a user's file; ", " joins several.
CASES = [
    # init
    ("init --preset nosuch", 2, "invalid choice", None),
    ("init -o qwen.toml", 2, "already exists", "qwen.toml"),
    ("init -o {c}/file.txt/qwen.toml", 2, "file.txt", None),
    ("init -o {c}/dir --force", 2, "is a directory", None),
    # validate / plan / verify: the manifest itself
    ("validate -c missing.toml", 2, "missing.toml does not exist", None),
    ("validate -c {c}/dir", 2, "is a directory", None),
    ("validate -c {c}/m/empty.toml", 2, "empty.toml", None),
    ("validate -c {c}/m/trunc.toml", 2, "trunc.toml", None),
    ("validate -c {c}/m/latin1.toml", 2, "UTF-8", None),
    ("validate -c {c}/m/utf16.toml", 2, "UTF-8", None),
    ("validate -c {c}/m/badutf8.toml", 2, "UTF-8", None),
    ("validate -c {c}/m/wrongtype.toml", 2, "dataset.seq_length", None),
    ("validate -c {c}/m/tableastype.toml", 2, "model", None),
    ("validate -c {c}/m/negative.toml", 2, "dataset.num_train", None),
    ("validate -c {c}/m/zero.toml", 2, "dataset.seq_length", None),
    ("validate -c {c}/m/huge.toml", 2, "dataset.seq_length", None),
    ("validate -c {c}/m/hugedevices.toml", 2, "hardware.devices_per_node", None),
    ("validate -c {c}/m/float.toml", 2, "dataset.num_train", None),
    ("validate -c {c}/m/missingkey.toml", 2, "train", None),
    ("validate -c {c}/m/nonascii.toml", 2, "'模型' holds characters an unquoted TOML name cannot", None),
    ("validate -c {c}/m/dupkey.toml", 2, "each key may be written once", None),
    ("validate -c {c}/m/nan.toml", 2, "train.learning_rate", None),
    ("validate -c {c}/m/floatdp.toml", 2, "parallel.data_parallel", None),
    ("validate -c {c}/m/smallbatch.toml", 2, "dataset.num_train: 10 rows are fewer than one global batch", None),
    ("validate -c {c}/m/blankprompt.toml", 2, "export.predict_data: a prompt needs text other than white space",
     None),
    ("validate -c {c}/m/compiledstrategy.toml", 2, "is where MindFormers saves the strategies it compiles", None),
    ("plan -c {c}/m/floatdp.toml", 2, "parallel.data_parallel", None),
    ("set -c qwen.toml train.learning_rate=1979-05-27", 2, "train.learning_rate", "qwen.toml"),
    ("set -c qwen.toml train.learning_rate=inf", 2, "train.learning_rate", "qwen.toml"),
    # a manifest string that would end a script's comment line, or is not what its key holds
    ("set -c qwen.toml 'hardware.nodes[0].host=x\ntouch X; exit 3 #'", 2, "hardware.nodes[0].host: found string "
     "'x\\ntouch X; exit 3 #', allowed: a host name", "qwen.toml"),
    ("set -c qwen.toml 'export.predict_data=\"hi\\nrm -rf ~\"'", 2, "export.predict_data: found a string holding a "
     "line feed", "qwen.toml"),
    ("set -c qwen.toml hardware.python=/usr/bin/python3.11", 2, "hardware.python", "qwen.toml"),
    ("set -c qwen.toml hardware.env_script=env.sh", 2, "hardware.env_script: found string 'env.sh', allowed: an "
     "absolute path", "qwen.toml"),
    ("validate --bogus", 2, "unrecognized arguments", None),
    ("plan -c missing.toml", 2, "missing.toml does not exist", None),
    ("plan -c {c}/m/utf16.toml", 2, "UTF-8", None),
    ("plan -c {c}/m/huge.toml", 2, "dataset.seq_length", None),
    ("plan -c {c}/m/hugedevices.toml --no-status", 2, "hardware.devices_per_node", None),
    ("verify -c {c}/m/trunc.toml", 2, "trunc.toml", None),
    ("verify -c {c}/m/good.toml", 2, "qwen.lock", None),
    # set
    ("set", 2, "required", None),
    ("set -c {c}/m/good.toml nonsense", 2, "is not KEY=VALUE", None),
    ("set -c missing.toml train.seed=1", 2, "missing.toml does not exist", None),
    ("set -c {c}/m/latin1.toml train.seed=1", 2, "UTF-8", None),
    ("set -c qwen.toml train.nosuch=1", 2, "train.nosuch", "qwen.toml"),
    ("set -c qwen.toml dataset.seq_length=abc", 2, "dataset.seq_length", "qwen.toml"),
    ("set -c qwen.toml dataset.seq_length=1000000000000", 2, "dataset.seq_length", "qwen.toml"),
    ("set -c qwen.toml dataset.num_train=-1", 2, "dataset.num_train", "qwen.toml"),
    ("set -c qwen.toml train=5", 2, "train", "qwen.toml"),
    ("set -c qwen.toml dataset.seq_length=[1,", 2, "dataset.seq_length", "qwen.toml"),
    # hccl_tools / merge_hccl
    ("hccl_tools --device_num 0-8 --server_ip 10.0.0.1", 2, "--device_num '0-8'", None),
    ("hccl_tools --device_num [0,100) --server_ip 10.0.0.1", 2, "beyond the 8 devices", None),
    ("hccl_tools --device_num [0,2) --server_ip 10.0.0.1 --device_num_per_node -1", 2, "--device_num", None),
    ("hccl_tools --visible_devices a,b --server_ip 10.0.0.1", 2, "--visible_devices", None),
    ("hccl_tools --server_ip 999.1.1.1", 2, "--server_ip '999.1.1.1'", None),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf missing.conf", 2, "missing.conf", None),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf {c}/hccn_empty.conf", 2, "address_0", None),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf {c}/hccn_badip.conf", 2, "999.1.2.3", None),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf {c}/hccn_latin1.conf", 2,
     "hccn_latin1.conf line 1: address_0", None),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf {c}/dir", 2, "address_0", None),
    ("merge_hccl", 2, "required", None),
    ("merge_hccl missing.json", 2, "missing.json does not exist", None),
    ("merge_hccl {c}/empty", 2, "not valid JSON", None),
    ("merge_hccl {c}/rt_trunc.json", 2, "rt_trunc.json", None),
    ("merge_hccl {c}/rt_utf16.json", 2, "rt_utf16.json", None),
    ("merge_hccl {c}/rt_list.json", 2, "has no server_list", None),
    ("merge_hccl {c}/rt_node.json {c}/rt_node.json --output out.json", 2, "is in both", "out.json"),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf {c}/hccn_badip2.conf", 2,
     "hccn_badip2.conf line 2: address_0 '10.0.0.x' is not an IP address", None),
    ("merge_hccl {c}/rt_noservers.json", 2, "has no server_list", None),
    ("merge_hccl {c}/rt_wrongtype.json", 2, "rt_wrongtype.json", None),
    ("merge_hccl {c}/dir", 2, "dir is a directory, not a JSON file", None),
    ("merge_hccl {c}/badutf8.json --output out.json", 2, "badutf8.json", "out.json"),
    # strategy
    ("strategy", 2, "--model_dir", None),
    ("strategy --model_dir missing", 2, "missing", None),
    ("strategy --model_dir {c}/file.txt", 2, "file.txt", None),
    ("strategy --model_dir {c}/hf_emptycfg", 2, "config.json", None),
    ("strategy --model_dir {c}/hf_wrongcfg", 2, "hidden_size", None),
    ("strategy --model_dir {c}/hf_listcfg", 2, "config.json", None),
    ("strategy --model_dir {c}/hf_zerocfg", 2, "num_attention_heads", None),
    ("strategy --model_dir {c}/hf_utf16cfg", 2, "config.json", None),
    ("strategy --model_dir {c}/hf_cfgdir", 2, "config.json", None),
    ("strategy --model_dir {c}/hf --data_parallel 0", 2, "data_parallel", None),
    ("strategy --model_dir {c}/hf --model_parallel -2", 2, "model_parallel", None),
    ("strategy --model_dir {c}/hf --model_parallel 3", 2, "model_parallel", None),
    ("strategy --model_dir {c}/hf --data_parallel 1000000000000", 2, "data_parallel", None),
    ("strategy --model_dir {c}/hf --pipeline_stage 5", 2, "pipeline_stage", None),
    ("strategy --model_dir {c}/hf --offset x", 2, "--offset", None),
    ("strategy --model_dir {c}/hf --offset {}", 2, "offset", None),
    ("strategy --model_dir {c}/hf --data_parallel two", 2, "invalid int value", None),
    ("strategy --model_dir {c}/hf --output_dir {c}/file.txt/s", 2, "file.txt", None),
    ("strategy --check missing", 2, "missing", None),
    ("strategy --check {c}/strategy_empty_dir", 2, "strategy_empty_dir", None),
    ("strategy --check {c}/strategy_dir", 2, "ckpt_strategy_rank_0.json", None),
    ("strategy --check {c}/file.txt", 2, "file.txt", None),
    # transform_ckpt
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt", 2, "required", None),
    ("transform_ckpt --src_ckpt_dir missing --dst_ckpt_dir out", 2, "missing", None),
    ("transform_ckpt --src_ckpt_dir {c}/empty.ckpt --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy", 2,
     "empty.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/trunc.ckpt --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy", 2,
     "trunc.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/garbage.ckpt --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy", 2,
     "garbage.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/src_trunc --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy", 2,
     "checkpoint_0.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/dir --dst_ckpt_dir out", 2, "dir", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_dir out --dst_ckpt_strategy missing.ckpt", 2,
     "missing.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy_garbage.ckpt",
     2, "strategy_garbage.ckpt", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_dir out --dst_ckpt_strategy {c}/strategy_empty_dir",
     2, "strategy_empty_dir", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_dir {c}/file.txt/out --dst_ckpt_strategy {c}/strategy",
     2, "file.txt", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_dir out", 2, "nothing to reshard", None),
    # tokenizer
    ("tokenizer", 2, "--output_dir", None),
    ("tokenizer --output_dir tok --vocab_size 300", 2, "--vocab_size only applies", None),
    ("tokenizer --output_dir tok --train_from {c}/alpaca.json", 2, "--train_from needs --vocab_size", None),
    ("tokenizer --output_dir tok --train_from {c}/alpaca.json --vocab_size 0", 2, "vocab_size", None),
    ("tokenizer --output_dir tok --train_from {c}/alpaca.json --vocab_size -5", 2, "vocab_size", None),
    ("tokenizer --output_dir tok --train_from {c}/alpaca.json --vocab_size 1000000000000", 2, "vocab_size", None),
    ("tokenizer --output_dir tok --train_from missing.json --vocab_size 300", 2, "missing.json", None),
    ("tokenizer --output_dir tok --train_from {c}/empty --vocab_size 300", 2, "empty", None),
    ("tokenizer --output_dir tok --train_from {c}/trunc.json --vocab_size 300", 2, "trunc.json", None),
    ("tokenizer --output_dir tok --train_from {c}/numbers.json --vocab_size 300", 2, "numbers.json", None),
    ("tokenizer --output_dir tok --train_from {c}/utf16.json --vocab_size 300", 2, "utf16.json", None),
    ("tokenizer --output_dir tok --train_from {c}/latin1.json --vocab_size 300", 2, "latin1.json", None),
    ("tokenizer --output_dir tok --train_from {c}/dir --vocab_size 300", 1, "dir: Is a directory", None),
    ("tokenizer --output_dir {c}/file.txt/tok --train_from {c}/alpaca.json --vocab_size 300", 2, "file.txt", None),
    ("tokenizer --output_dir tok --tiktoken_file missing.tiktoken", 2, "missing.tiktoken", None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/tiktoken_empty", 2, "tiktoken_empty", None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/tiktoken_garbage", 2, "tiktoken_garbage", None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/tiktoken_latin1", 2, "tiktoken_latin1", None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/dir", 2, "dir", None),
    ("tokenizer --output_dir tok --train_from {c}/trunc.json --vocab_size 300", 2, "trunc.json", "tok<tok"),
    # alpaca_converter
    ("alpaca_converter --data_path missing.json", 2, "missing.json", None),
    ("alpaca_converter --data_path {c}/empty --output_path out.jsonl", 2, "empty", None),
    ("alpaca_converter --data_path {c}/trunc.json --output_path out.jsonl", 2, "trunc.json", "out.jsonl"),
    ("alpaca_converter --data_path {c}/obj.json --output_path out.jsonl", 2, "obj.json", None),
    ("alpaca_converter --data_path {c}/deep.json --output_path out.jsonl", 2, "nested too deeply", "out.jsonl"),
    ("alpaca_converter --data_path {c}/pretty_obj.json --output_path out.jsonl", 2,
     "holds one JSON object spread over several lines", None),
    ("alpaca_converter --data_path {c}/numbers.json --output_path out.jsonl", 2, "numbers.json", None),
    ("alpaca_converter --data_path {c}/wrongtype.json --output_path out.jsonl", 2, "instruction", "out.jsonl"),
    ("alpaca_converter --data_path {c}/latin1.json --output_path out.jsonl", 2, "UTF-8", None),
    ("alpaca_converter --data_path {c}/utf16.json --output_path out.jsonl", 2, "utf16.json", None),
    ("alpaca_converter --data_path {c}/badutf8.json --output_path out.jsonl", 2, "UTF-8", None),
    ("alpaca_converter --data_path {c}/dir --output_path out.jsonl", 2, "dir", None),
    ("alpaca_converter --data_path {c}/alpaca.json --output_path {c}/file.txt/out.jsonl", 2, "file.txt", None),
    ("alpaca_converter --data_path {c}/alpaca.json --output_path {c}/dir", 2, "dir", None),
    # preprocess and its original name
    ("preprocess", 2, "--input_glob", None),
    ("preprocess --input_glob nomatch*.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt",
     2, "nomatch", None),
    ("preprocess --input_glob {c}/empty --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "empty", None),
    ("preprocess --input_glob {c}/chat_trunc.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "chat_trunc.jsonl", "out.mindrecord"),
    ("preprocess --input_glob {c}/chat_long_prompt.jsonl --vocab_file {c}/tok/vocab.json --merges_file "
     "{c}/tok/merges.txt --seq_length 16 --mask_prompt --output_file out.mindrecord", 2,
     "chat_long_prompt.jsonl line 1", "out.mindrecord"),
    ("preprocess --input_glob {c}/chat_long.jsonl --vocab_file {c}/tok/vocab.json --merges_file "
     "{c}/tok/merges.txt --seq_length 16 --output_file out.mindrecord", 2, "most of the data would be cut off", None),
    ("preprocess --input_glob {c}/chat_wrongtype.jsonl --vocab_file {c}/tok/vocab.json "
     "--merges_file {c}/tok/merges.txt --output_file out.mindrecord", 2, "chat_wrongtype.jsonl", None),
    ("preprocess --input_glob {c}/chat_numbers.jsonl --vocab_file {c}/tok/vocab.json "
     "--merges_file {c}/tok/merges.txt --output_file out.mindrecord", 2, "chat_numbers.jsonl", None),
    ("preprocess --input_glob {c}/chat_latin1.jsonl --vocab_file {c}/tok/vocab.json "
     "--merges_file {c}/tok/merges.txt --output_file out.mindrecord", 2, "chat_latin1.jsonl", None),
    ("preprocess --input_glob {c}/chat_utf16.jsonl --vocab_file {c}/tok/vocab.json "
     "--merges_file {c}/tok/merges.txt --output_file out.mindrecord", 2, "chat_utf16.jsonl", None),
    ("preprocess --input_glob {c}/dir --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "dir", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file missing.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "missing.json", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/empty --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "empty", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/vocab_trunc.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "vocab_trunc.json", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/vocab_list.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "vocab_list.json", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/utf16.json "
     "--output_file out.mindrecord", 2, "utf16.json", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/dir "
     "--output_file out.mindrecord", 1, "dir: Is a directory", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--seq_length 0 --output_file out.mindrecord", 2, "--seq_length", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--seq_length -3 --output_file out.mindrecord", 2, "--seq_length", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--seq_length 1000000000000 --output_file out.mindrecord", 2, "--seq_length", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--file_partition 0 --output_file out.mindrecord", 2, "--file_partition", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--file_partition 1000000 --output_file out.mindrecord", 2, "--file_partition", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--processes -1 --output_file out.mindrecord", 2, "--processes", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file {c}/file.txt/out.mindrecord", 1, "file.txt", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file {c}/dir", 2, "dir", None),
    ("qwen1_5_preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json "
     "--merges_file {c}/tok/merges.txt --seq_length x", 2, "invalid int value", None),
    # instructions
    ("instructions", 2, "--output_dir", None),
    ("instructions --output_dir data --num_train -1", 2, "--num_train", None),
    ("instructions --output_dir data --num_train 0", 2, "--num_train", None),
    ("instructions --output_dir data --num_heldout -1", 2, "--num_heldout", None),
    ("instructions --output_dir data --num_train 1000000000000", 2, "--num_train", None),
    ("instructions --output_dir data --seed -1", 2, "--seed", None),
    ("instructions --output_dir {c}/file.txt/data --num_train 5 --num_heldout 1", 2, "file.txt", None),
    ("instructions --output_dir {c}/file.txt --num_train 5 --num_heldout 1", 2, "file.txt", None),
    # convert_weight
    ("convert_weight", 2, "--torch_ckpt_dir", None),
    ("convert_weight --torch_ckpt_dir missing", 2, "missing", None),
    ("convert_weight --torch_ckpt_dir {c}/file.txt", 2, "file.txt", None),
    ("convert_weight --torch_ckpt_dir {c}/dir", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_emptycfg", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_trunccfg", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_wrongcfg", 2, "hidden_size", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_listcfg", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_zerocfg", 2, "num_attention_heads", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_negcfg", 2, "vocab_size", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_utf16cfg", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_latin1cfg", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_cfgdir", 2, "config.json", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_noweights", 2, "hf_noweights", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_truncst", 2, "model.safetensors", "transform.ckpt"),
    ("convert_weight --torch_ckpt_dir {c}/hf_emptyst", 2, "model.safetensors", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_garbagest", 2, "model.safetensors", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_hugeheader", 2, "model.safetensors", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_stdir", 2, "model.safetensors", None),
    ("convert_weight --torch_ckpt_dir {c}/hf --dtype int8", 2, "invalid choice", None),
    ("convert_weight --torch_ckpt_dir {c}/hf --mindspore_ckpt_path {c}/file.txt/x.ckpt", 2, "file.txt", None),
    ("convert_weight --torch_ckpt_dir {c}/hf --mindspore_ckpt_path {c}/dir", 2, "dir", None),
    # convert_reversed
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt", 2, "--torch_ckpt_path", None),
    ("convert_reversed --mindspore_ckpt_path missing.ckpt --torch_ckpt_path out", 2, "missing.ckpt", None),
    ("convert_reversed --mindspore_ckpt_path {c}/empty.ckpt --torch_ckpt_path out", 2, "empty.ckpt", None),
    ("convert_reversed --mindspore_ckpt_path {c}/trunc.ckpt --torch_ckpt_path out", 2, "trunc.ckpt", "out"),
    ("convert_reversed --mindspore_ckpt_path {c}/garbage.ckpt --torch_ckpt_path out", 2, "garbage.ckpt", None),
    ("convert_reversed --mindspore_ckpt_path {c}/dir --torch_ckpt_path out", 2, "dir", None),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --torch_ckpt_path out --config missing.json", 2,
     "missing.json", None),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --torch_ckpt_path out --config {c}/hf_trunccfg", 2,
     "config.json", None),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --torch_ckpt_path out --config {c}/hf_wrongcfg", 2,
     "hidden_size", None),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --config {c}/hf --torch_ckpt_path {c}/file.txt/out", 2,
     "file.txt", None),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --config {c}/hf --torch_ckpt_path {c}/file.txt", 2,
     "file.txt", None),
    # export
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf", 2, "--seq_length", None),
    ("export --load_checkpoint missing.ckpt --torch_ckpt_dir {c}/hf --seq_length 8", 2, "missing.ckpt", None),
    ("export --load_checkpoint {c}/trunc.ckpt --torch_ckpt_dir {c}/hf --seq_length 8", 2, "trunc.ckpt", None),
    ("export --load_checkpoint {c}/empty.ckpt --torch_ckpt_dir {c}/hf --seq_length 8", 2, "empty.ckpt", None),
    ("export --load_checkpoint {c}/dir --torch_ckpt_dir {c}/hf --seq_length 8", 2, "dir", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir missing --seq_length 8", 2, "missing", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf_trunccfg --seq_length 8", 2, "config.json", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 0", 2, "seq_length", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length -8", 2, "seq_length", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 1000000000000", 2, "seq_length", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 8 --batch_size 0", 2, "batch_size",
     None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 8 --batch_size 1000000000000", 2,
     "batch_size", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 8 --rank -1", 2, "rank", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 8 --tokenizer_dir missing", 2,
     "missing", None),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir {c}/hf --seq_length 8 --output_dir {c}/file.txt/o", 1,
     "file.txt", None),
    # infer
    ("infer --tokenizer_dir {c}/tok", 2, "--predict_data", None),
    ("run_qwen1_5_mslite_infer --mindir_root_dir {c}/mindir_empty --vocab_file {c}/tok/vocab.json --predict_data hi",
     2, "--merge_file", None),
    ("infer --mindir_root_dir {c}/mindir_empty --vocab_file missing.json --merge_file {c}/tok/merges.txt "
     "--predict_data hi", 2, "missing.json", None),
    ("infer --mindir_root_dir missing --tokenizer_dir {c}/tok --predict_data hi", 2, "missing", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi", 2, "mindir_empty", None),
    ("infer --mindir_root_dir {c}/mindir_badjson --tokenizer_dir {c}/tok --predict_data hi", 2, "rank_0_graph.json",
     None),
    ("infer --mindir_root_dir {c}/file.txt --tokenizer_dir {c}/tok --predict_data hi", 2, "file.txt", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir missing --predict_data hi", 2, "missing", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --max_new_tokens -1", 2,
     "--max_new_tokens", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --top_p 2", 2, "top_p",
     None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --temperature -1", 2,
     "temperature", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --top_k -1", 2, "top_k",
     None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --do_sample maybe", 2,
     "expected true or false", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --repetition_penalty 0", 2,
     "--repetition_penalty", None),
    # finetune and eval_heldout: run.json and the files it names
    ("finetune", 2, "--config", None),
    ("finetune --config missing.json", 2, "missing.json does not exist", None),
    ("finetune --config {c}/empty", 2, "not valid JSON", None),
    ("finetune --config {c}/utf16.json", 2, "utf16.json", None),
    ("finetune --config {c}/numbers.json", 2, "expected a JSON object", None),
    ("finetune --config {c}/run_unknown.json", 2, "unknown key(s) lerning_rate", None),
    ("finetune --config {c}/run_zero.json", 2, "'batch_size' is 0", None),
    ("finetune --config {c}/run_beta.json", 2, "'beta1'", None),
    ("finetune --config {c}/run_model.json", 2, "num_heads", None),
    ("finetune --config {c}/run_modeltype.json", 2, "'model'", None),
    ("finetune --config {c}/dir", 2, "dir is a directory, not a JSON file", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --tokenizer_dir {c}/tok --heldout {c}/alpaca.json", 2, "--config", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/trunc.json --tokenizer_dir {c}/tok --heldout "
     "{c}/alpaca.json", 2, "trunc.json is not valid JSON", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config missing.json --tokenizer_dir {c}/tok --heldout "
     "{c}/alpaca.json", 2, "missing.json does not exist", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf_zerocfg/config.json --tokenizer_dir {c}/tok --heldout "
     "{c}/alpaca.json", 2, "num_attention_heads", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf/config.json --tokenizer_dir {c}/tok --heldout "
     "{c}/trunc.json", 2, "trunc.json", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf/config.json --tokenizer_dir {c}/tok --heldout "
     "{c}/obj.json", 2, "obj.json", None),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf/config.json --tokenizer_dir missing --heldout "
     "{c}/alpaca.json", 2, "missing", None),
    # ---- nothing the user had is lost: one rule for every output (store.output_path)
    ("tokenizer --output_dir . --train_from data.jsonl --vocab_size 300", 2, "holds the input data.jsonl",
     "data.jsonl<alpaca.json"),
    ("tokenizer --output_dir work --train_from work/data.jsonl --vocab_size 300", 2, "holds the input",
     "work/data.jsonl<alpaca.json"),
    ("tokenizer --output_dir mine", 2, "holds what qwenbuild did not write there (user.txt)", "mine/"),
    ("strategy --model_dir {c}/hf --output_dir mine", 2, "holds what qwenbuild did not write", "mine/"),
    ("strategy --model_dir hf --output_dir hf/strategy", 2, "lies inside the input hf", "hf<hf"),
    ("convert_reversed --mindspore_ckpt_path dir/ms.ckpt --torch_ckpt_path dir", 2, "holds the input",
     "dir/ms.ckpt<ms.ckpt"),
    ("convert_reversed --mindspore_ckpt_path {c}/ms.ckpt --config {c}/hf --torch_ckpt_path out", 2,
     "is a symbolic link", "out->target"),
    ("convert_weight --torch_ckpt_dir hf --mindspore_ckpt_path hf/model.safetensors", 2, "lies inside the input hf",
     "hf<hf"),
    ("convert_weight --torch_ckpt_dir hf --mindspore_ckpt_path same.ckpt", 2, "is a hard link of",
     "hf<hf, same.ckpt=>hf/config.json"),
    ("convert_weight --torch_ckpt_dir {c}/hf --mindspore_ckpt_path /dev/null", 2, "/dev/null is a device", None),
    ("convert_weight --torch_ckpt_dir {c}/hf --mindspore_ckpt_path out.ckpt", 2, "is a symbolic link",
     "out.ckpt->mine.ckpt"),
    ("alpaca_converter --data_path rows.json --output_path rows.json", 2, "is the input", "rows.json<alpaca.json"),
    ("alpaca_converter --data_path rows.json --output_path same.json", 2, "is the input",
     "rows.json<alpaca.json, same.json->rows.json"),
    ("alpaca_converter --data_path /dev/zero --output_path out.jsonl", 2, "/dev/zero is a device", "out.jsonl"),
    ("tokenizer --output_dir tok --train_from /dev/zero --vocab_size 300", 2, "/dev/zero is a device", None),
    ("tokenizer --output_dir tok --tiktoken_file /dev/zero", 2, "/dev/zero is a device", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file /dev/zero "
     "--output_file out.mindrecord", 2, "/dev/zero is a device", None),
    ("preprocess --input_glob chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file chat.jsonl", 2, "is the input", "chat.jsonl<chat.jsonl"),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "is a symbolic link", "out.mindrecord.db->mine.db"),
    ("merge_hccl rt.json --output rt.json", 2, "is the input", "rt.json<rt_node.json"),
    ("instructions --output_dir data --num_train 5 --num_heldout 1", 2, "is a symbolic link",
     "data/train.json->mine.json"),
    ("export --load_checkpoint {c}/ms.ckpt --torch_ckpt_dir hf --output_dir hf --seq_length 8", 2,
     "lies inside the input hf", "hf<hf"),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf/config.json --tokenizer_dir {c}/tok --heldout "
     "rows.json --metrics rows.json", 2, "is the input", "rows.json<alpaca.json"),
    ("eval_heldout --checkpoint {c}/ms.ckpt --config {c}/hf/config.json --tokenizer_dir {c}/tok --heldout "
     "{c}/alpaca.json --metrics notes.json", 2, "metrics file", "notes.json"),
    ("hccl_tools --device_num [0,1) --server_ip 10.0.0.1 --hccn_conf /dev/zero", 2, "/dev/zero is a device", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms2.ckpt --dst_ckpt_strategy {c}/strategy_mp2 --dst_ckpt_dir out "
     "--prefix ../../x", 2, "--prefix", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms2.ckpt --dst_ckpt_strategy {c}/strategy_mp2 --dst_ckpt_dir out "
     "--prefix /tmp/x", 2, "--prefix", None),
    ("set -c link.toml train.seed=1", 2, "loop of symbolic links", "link.toml->link.toml"),
    ("validate -c loop.toml", 2, "loop of symbolic links", "loop.toml->loop.toml"),
    # ---- relations nobody checked
    ("transform_ckpt --src_ckpt_dir {c}/shards_mp2 --src_ckpt_strategy {c}/strategy_pp2 --dst_ckpt_dir out", 2,
     "which the source strategy puts on stage 1", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms2.ckpt --dst_ckpt_strategy {c}/strategy_other --dst_ckpt_dir out", 2,
     "model.layers.2", None),
    ("transform_ckpt --src_ckpt_dir {c}/shards_dup --src_ckpt_strategy {c}/strategy_mp2 --dst_ckpt_dir out", 2,
     "is a copy of another rank's shard", None),
    ("transform_ckpt --src_ckpt_dir {c}/ms.ckpt --dst_ckpt_strategy {c}/strategy_mp2 --dst_ckpt_dir out", 2,
     "which the source checkpoint does not hold", None),
    ("set -c qwen.toml train.seed=4294967296", 2, "train.seed", "qwen.toml"),
    ("set -c qwen.toml train.steps=100000000000000000000", 2, "train.steps", "qwen.toml"),
    ("set -c qwen.toml export.batch_size=1000000", 2, "export.batch_size", "qwen.toml"),
    ("set -c qwen.toml parallel.offset=[1]", 2, "pipeline_stage is 1", "qwen.toml"),
    ("set -c qwen.toml parallel.data_parallel=1 parallel.pipeline_stage=2 parallel.micro_batch_num=2 "
     "parallel.offset=[-2,2]", 2, "leaves pipeline stage 0 without a layer", "qwen.toml"),
    ("validate -c {c}/m/hfnan.toml", 2, "key 'rms_norm_eps': found float nan", None),
    ("validate -c {c}/m/hffile.toml", 2, "model.hf_dir", None),
    ("validate -c {c}/m/hfllama.toml", 2, "model_type", None),
    ("strategy --model_dir {c}/hf_infcfg", 2, "key 'rope_theta': found float inf", None),
    ("strategy --model_dir {c}/hf_negthetacfg", 2, "key 'rope_theta': found int -5", None),
    ("strategy --model_dir {c}/hf_strthetacfg", 2, "key 'rope_theta': found string 'abc'", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_llamacfg", 2, "model_type", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_tiedcfg", 2, "lm_head.weight that differs", "transform.ckpt"),
    ("convert_weight --torch_ckpt_dir {c}/hf_escape", 2, "not a file name", None),
    ("convert_weight --torch_ckpt_dir {c}/hf_absolute", 2, "not a file name", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/vocab_dup.json --merges_file {c}/tok/merges.txt "
     "--output_file out.mindrecord", 2, "vocab_dup.json: tokens 'a' and 'b' both have id 0", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/vocab_negative.json --merges_file "
     "{c}/tok/merges.txt --output_file out.mindrecord", 2, "vocab_negative.json: token 'a' has the negative id",
     None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/merges_empty.txt "
     "--output_file out.mindrecord", 2, "merges_empty.txt holds no merges", None),
    ("preprocess --input_glob {c}/chat.jsonl --vocab_file {c}/tok/vocab.json --merges_file {c}/tok/merges.txt "
     "--processes 100000 --output_file out.mindrecord", 2, "--processes must lie in 0..256", None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/tiktoken_duprank", 2, "rank 0 was given already on line 1",
     None),
    ("tokenizer --output_dir tok --tiktoken_file {c}/tiktoken_duptoken", 2, "was ranked already on line 1", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --repetition_penalty nan",
     2, "--repetition_penalty", None),
    ("infer --mindir_root_dir {c}/mindir_empty --tokenizer_dir {c}/tok --predict_data hi --do_sample True "
     "--temperature inf", 2, "--temperature", None),
    # ---- tracebacks left
    ("alpaca_converter --data_path {c}/longint.json --output_path out.jsonl", 2, "a number too long", "out.jsonl"),
    ("merge_hccl {c}/rt_longint.json", 2, "a number too long", None),
    ("strategy --model_dir {c}/hf_longintcfg", 2, "a number too long", None),
    ("merge_hccl {c}/rt_iplist.json", 2, "device_ip is [\"192.168.1.1\"], not a string", None),
]


def _id(case) -> str:
    words = case[0].replace("{c}/", "").split()
    return "-".join(w.lstrip("-") for w in words[:1] + words[1:][-3:])[:60]


def _files(root: Path) -> dict[str, bytes]:
    """Every file a run left in its working directory (a link as where it points), apart from MindSpore's and
    MindFormers' own logs."""
    skip = ("output/log", "rank_0", "kernel_meta")
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(skip):
            continue
        if p.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def _prepare(tmp_path: Path, corpus: Path, existing: str, manifest: bool) -> None:
    """Make what a case's user had before the run (see CASES)."""
    for item in existing.split(", "):
        target = tmp_path / re.split("<|->|=>", item)[0].rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if "<" in item:
            source = corpus / item.split("<")[1]
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        elif "=>" in item:
            os.link(tmp_path / item.split("=>")[1], target)
        elif "->" in item:
            link_to = item.split("->")[1]
            if link_to != target.name:
                (target.parent / link_to).write_bytes(SENTINEL)
            target.symlink_to(link_to)
        elif item.endswith("/"):
            target.mkdir()
            (target / "user.txt").write_bytes(SENTINEL)
        else:
            target.write_bytes((corpus / "m" / "good.toml").read_bytes() if manifest else SENTINEL)


@pytest.mark.parametrize("argv, code, phrase, existing", CASES, ids=[_id(c) for c in CASES])
def test_bad_input(corpus, tmp_path, argv, code, phrase, existing):
    if existing:
        _prepare(tmp_path, corpus, existing, argv.startswith("set "))
    before = _files(tmp_path)
    args = [a.replace("{c}", str(corpus)) for a in shlex.split(argv)]
    env = {**os.environ, "QWENBUILD_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "qwenbuild", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert f"qwenbuild {args[0]}: error: " in proc.stderr and phrase in proc.stderr, proc.stderr
    assert _files(tmp_path) == before, "a failed run left or changed files"


def test_corpus_covers_every_subcommand():
    covered = {c[0].split()[0] for c in CASES}
    assert set(COMMANDS) <= covered, sorted(set(COMMANDS) - covered)


def test_debug_variable_keeps_the_traceback(corpus, tmp_path):
    env = {**os.environ, "QWENBUILD_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "qwenbuild", "tokenizer", "--output_dir", "tok", "--train_from",
                           str(corpus / "dir"), "--vocab_size", "300"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "IsADirectoryError" in proc.stderr


def test_a_failed_export_leaves_no_empty_graph_directories(corpus, tmp_path):
    """The export fails inside MindSpore (the config does not describe the checkpoint): no directory is left."""
    (tmp_path / "hf").mkdir()
    config = json.loads((corpus / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    proc = subprocess.run([sys.executable, "-m", "qwenbuild", "export", "--load_checkpoint", str(corpus / "ms.ckpt"),
                           "--torch_ckpt_dir", "hf", "--output_dir", "exported/graphs", "--seq_length", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.json" in proc.stderr
    assert not (tmp_path / "exported").exists()


def test_a_damaged_lock_is_named_by_plan_and_doit(tmp_path):
    (tmp_path / "qwen.toml").write_text((Path(__file__).resolve().parents[1] / "qwen.toml").read_text())
    (tmp_path / "dodo.py").write_text((Path(__file__).resolve().parents[1] / "dodo.py").read_text())
    lock = tmp_path / "build" / "qwen.lock"
    lock.parent.mkdir()
    lock.write_text('{"version": 1, "tasks": {"tokenizer": ')
    for argv in ([sys.executable, "-m", "qwenbuild", "plan"], [str(Path(sys.executable).parent / "doit"), "list"],
                 [str(Path(sys.executable).parent / "doit"), "finetune"]):
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "build/qwen.lock is damaged (not valid JSON: line 1 column" in proc.stderr, proc.stderr
        assert "delete qwen.lock to rebuild" in proc.stderr
    assert lock.read_text() == '{"version": 1, "tasks": {"tokenizer": '


def test_an_unusable_build_dir_is_named_by_doit(tmp_path):
    (tmp_path / "qwen.toml").write_text((Path(__file__).resolve().parents[1] / "qwen.toml").read_text())
    (tmp_path / "dodo.py").write_text((Path(__file__).resolve().parents[1] / "dodo.py").read_text())
    (tmp_path / "file.txt").write_text("in the way\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "doit"), "build_dir=file.txt/build", "list"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot use the build dir" in proc.stderr and "file.txt" in proc.stderr
    assert (tmp_path / "file.txt").read_text() == "in the way\n"


def _project(tmp_path: Path) -> Path:
    for name in ("qwen.toml", "dodo.py"):
        (tmp_path / name).write_text((Path(__file__).resolve().parents[1] / name).read_text())
    return tmp_path


def _doit(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "doit"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("lock_text", ['{"version": 1, "tasks": {"tokenizer": 5}}',
                                       '{"version": 1, "tasks": {"tokenizer": {"artifacts": []}}}',
                                       '{"version": 1, "tasks": {"tokenizer": {"artifacts": {"x": {"kind": "dir", '
                                       '"digest": "d"}}, "inputs": {}, "manifest": {}, "toolchain": {}}}}'])
def test_a_lock_of_valid_json_and_the_wrong_shape_is_called_damaged(tmp_path, lock_text):
    lock = _project(tmp_path) / "build" / "qwen.lock"
    lock.parent.mkdir()
    lock.write_text(lock_text)
    for argv in ([sys.executable, "-m", "qwenbuild", "plan"], [str(Path(sys.executable).parent / "doit"), "list"]):
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "build/qwen.lock is damaged (task 'tokenizer':" in proc.stderr, proc.stderr
    assert lock.read_text() == lock_text


def test_a_build_dir_holding_the_users_files_is_refused(tmp_path):
    """build.dir at an existing directory of the user's: its tokenizer/ and launch/ are not replaced."""
    project = _project(tmp_path)
    mine = project / "mine"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "notes.txt").write_bytes(SENTINEL)
    (project / "qwen.toml").write_text((project / "qwen.toml").read_text().replace('dir = "build"', 'dir = "mine"'))
    for argv in (["tokenizer"], ["list"]):
        proc = _doit(project, *argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"build.dir {mine} already holds files qwenbuild did not write (tokenizer)" in proc.stderr
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["tokenizer", "tokenizer/notes.txt"]
    (project / "qwen.toml").write_text((project / "qwen.toml").read_text().replace('dir = "mine"', 'dir = "."'))
    proc = _doit(project, "list")
    assert proc.returncode == 2 and "holds the input" in proc.stderr and "qwen.toml" in proc.stderr, proc.stderr


def test_a_missing_manifest_named_to_doit_hints_at_doit(tmp_path):
    proc = _doit(_project(tmp_path), "manifest=missing.toml", "list")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "missing.toml does not exist" in proc.stderr and "doit manifest=PATH" in proc.stderr


@pytest.mark.slow  # a doit build, if of the smallest task
def test_doit_forget_makes_the_task_run_again(tmp_path):
    project = _project(tmp_path)
    assert _doit(project, "dataset").returncode == 0
    status = _doit(project, "list", "--status").stdout
    assert re.search(r"^U\s+dataset", status, re.M), status
    proc = _doit(project, "forget", "dataset")
    assert proc.returncode == 0 and "forgetting dataset" in proc.stdout, proc.stdout + proc.stderr
    status = _doit(project, "list", "--status").stdout
    assert re.search(r"^R\s+dataset", status, re.M), status
