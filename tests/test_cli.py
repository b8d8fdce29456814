"""The qwenbuild command: init, validate, set and plan as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

QWENBUILD = [sys.executable, "-m", "qwenbuild"]
REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run(QWENBUILD + list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_commands_without_importing_mindspore(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("init", "validate", "plan", "set"):
        assert f"\n    {name} " in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from qwenbuild.cli import build_parser; "
                            "build_parser(); print('mindspore' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_init_then_validate(tmp_path):
    import json

    from qwenbuild.manifest._presets import MODELS
    from qwenbuild.model import QwenConfig

    assert run("init", "--preset", "qwen1.5-72b", "-o", "q.toml", cwd=tmp_path).returncode == 0
    assert (tmp_path / "dodo.py").read_text() == (REPO / "dodo.py").read_text()
    missing = run("validate", "-c", "q.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "model.hf_dir" in missing.stderr and "does not exist" in missing.stderr
    hf = tmp_path / "models" / "Qwen1.5-72B"
    hf.mkdir(parents=True)
    dims = {k: v for k, v in MODELS["qwen1.5-72b"].items() if k != "compute_dtype"}
    (hf / "config.json").write_text(json.dumps(QwenConfig(**dims).to_hf_dict()))
    proc = run("validate", "-c", "q.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # the parameter count of transformers' own Qwen2 built from that config.json (on the meta device: no memory)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        reference = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config.from_pretrained(hf)).parameters())
    assert proc.stdout == f"{tmp_path / 'q.toml'}: valid; {reference / 1e6:,.1f}M parameters, 32 ascend devices\n"
    again = run("init", "-o", "q.toml", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_validate_exits_2_with_every_error(tmp_path):
    run("init", "-o", "qwen.toml", cwd=tmp_path)
    path = tmp_path / "qwen.toml"
    path.write_text(path.read_text().replace("model_parallel = 1", "model_parallel = 0")
                    .replace("learning_rate", "learnig_rate"))
    proc = run("validate", cwd=tmp_path)
    assert proc.returncode == 2
    assert "parallel.model_parallel: found int 0, allowed: integer >= 1" in proc.stderr
    assert "train.learnig_rate: unknown key; did you mean 'learning_rate'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_set_keeps_comments_and_refuses_rejected_values(tmp_path):
    run("init", "-o", "qwen.toml", cwd=tmp_path)
    path = tmp_path / "qwen.toml"
    before = path.read_text()
    proc = run("set", "train.learning_rate=1e-4", "export.predict_data=你好", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = path.read_text()
    assert "learning_rate = 1e-4" in after and 'predict_data = "你好"' in after
    assert [l for l in before.splitlines() if l.startswith("#")] == [l for l in after.splitlines() if l.startswith("#")]
    assert "# per data-parallel rank and micro batch" in after
    refused = run("set", "parallel.data_parallel=3", cwd=tmp_path)
    assert refused.returncode == 2 and "data_parallel 3 x model_parallel 1" in refused.stderr
    line = after.splitlines().index("data_parallel = 2") + 1
    assert f"qwen.toml:{line}: parallel.data_parallel" in refused.stderr and ".tmp-" not in refused.stderr
    assert path.read_text() == after
    assert not list(tmp_path.glob(".qwen.toml.*"))


def test_set_hf_dir_switches_to_the_checkpoint_dimensions(tmp_path):
    import json

    from qwenbuild.manifest import load_manifest
    from qwenbuild.model import QwenConfig

    run("init", "-o", "qwen.toml", cwd=tmp_path)
    (tmp_path / "hf").mkdir()
    cfg = QwenConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=96)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    proc = run("set", "model.hf_dir=hf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed model.preset" in proc.stdout
    m = load_manifest(tmp_path / "qwen.toml")
    assert (m.model.hidden_size, m.model.num_layers, m.model.n_kv_heads) == (64, 2, 2)


def test_plan_shows_ranks_memory_and_status(tmp_path):
    run("init", "--preset", "qwen1.5-72b", "-o", "qwen.toml", cwd=tmp_path)
    proc = run("plan", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rank_rows = [l.split() for l in lines if len(l.split()) == 8 and l.split()[0].isdigit()]
    assert [int(r[0]) for r in rank_rows] == list(range(32))
    assert [r[2] for r in rank_rows[::8]] == ["node0", "node1", "node2", "node3"]
    assert [r[7] for r in rank_rows[::8]] == ["0-19", "20-39", "40-59", "60-79"]
    assert "will run" in proc.stdout
    # the seed's float32 master weights, gradients and moments: 16 bytes per parameter, stage 3 close to the
    # 58GB MindSpore may take of a 64 GB card
    memory = {l.split()[1]: l.split()[2:] for l in lines if l.startswith("stage ") and "/ 58" in l}
    assert [memory[s][:4] for s in "0123"] == [["3427.1", "12.77", "12.77", "25.53"],
                                               ["2181.4", "8.13", "8.13", "16.25"],
                                               ["2181.4", "8.13", "8.13", "16.25"],
                                               ["3427.1", "12.77", "12.77", "25.53"]]
    assert [l for l in lines if l.startswith("warning: stage")] == [
        "warning: stage 3: estimated 57.2 GiB per device leaves 1.4% of max_device_memory 58GB "
        "(hardware.device_memory_gb 64 less the runtime's reserve) free (under 10%): the activations are an "
        "estimate, so the run may not fit"]
    card = next(l for l in lines if l.startswith("export card (mp 4)")).split()
    assert card[4:8] == ["19941.5", "37.14", "5.00", "0.91"]
    doc = json.loads(run("plan", "--json", "--no-status", cwd=tmp_path).stdout)
    assert [r["host"] for r in doc["ranks"][::8]] == ["node0", "node1", "node2", "node3"]
    stage0 = doc["memory"]["training"][0]["components"]
    assert {k: (v["bytes"], v["dtype"]) for k, v in stage0.items() if k != "activations"} == {
        "weights": (3427135488 * 4, "float32"), "gradients": (3427135488 * 4, "float32"),
        "optimizer": (3427135488 * 8, "float32")}
    assert stage0["activations"]["dtype"] == "bfloat16" and doc["hardware"]["limit_bytes"] == 58 * 2**30
    assert doc["memory"]["export"]["components"]["kv_cache"]["bytes"] == 2 * 80 * 8192 * 16 * 128 * 2


@pytest.mark.parametrize("args", [["validate", "-c", "missing.toml"], ["set", "novalue"], ["plan", "-c", "."]])
def test_bad_invocations_give_a_message_not_a_traceback(tmp_path, args):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_set_edits_appends_and_removes_nodes(tmp_path):
    from qwenbuild.manifest import load_manifest

    run("init", "--preset", "qwen1.5-72b", "-o", "qwen.toml", cwd=tmp_path)
    path = tmp_path / "qwen.toml"
    proc = run("set", "hardware.nodes[1].ip=10.0.0.22", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(path).hardware.nodes[1].ip == "10.0.0.22"
    # a fifth node is refused by the plan (32 ranks on 40 devices), the file untouched
    before = path.read_text()
    refused = run("set", "hardware.nodes[+].host=node4", "hardware.nodes[-1].ip=10.0.0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "40 devices" in refused.stderr and path.read_text() == before
    grown = run("set", "hardware.nodes[+].host=node4", "hardware.nodes[-1].ip=10.0.0.5",
                "parallel.micro_batch_num=60", "parallel.pipeline_stage=5", cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr
    m = load_manifest(path)
    assert [n.host for n in m.hardware.nodes] == ["node0", "node1", "node2", "node3", "node4"]
    assert "# device_ips" in path.read_text()  # comments kept
    shrunk = run("set", "--remove", "hardware.nodes[4]", "parallel.pipeline_stage=4", cwd=tmp_path)
    assert shrunk.returncode == 0, shrunk.stderr
    assert [n.ip for n in load_manifest(path).hardware.nodes][-1] == "192.168.1.4"
    missing = run("set", "hardware.nodes[7].ip=1.2.3.4", cwd=tmp_path)
    assert missing.returncode == 2 and "nodes has 4 entries" in missing.stderr


def test_strategy_takes_the_manifest_with_c(tmp_path):
    run("init", "--preset", "qwen1.5-72b", "-o", "q.toml", cwd=tmp_path)
    proc = run("strategy", "-c", "q.toml", "--output_dir", "s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "s").glob("ckpt_strategy_rank_*.json"))) == 32


def test_set_accepts_a_checkpoint_not_downloaded_yet_and_names_lines_of_the_users_file(tmp_path):
    """The README's flow: init, then set hf_dir while the download runs; validate still refuses it."""
    run("init", "--preset", "qwen1.5-7b", "-o", "qwen.toml", cwd=tmp_path)
    path = tmp_path / "qwen.toml"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("hf_dir")))
    proc = run("set", "model.hf_dir=models/Qwen1.5-7B", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'preset = "qwen1.5-7b"' in path.read_text()  # the preset plans until the checkpoint is there
    hf_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("hf_dir"))
    assert f"warning: qwen.toml:{hf_line}: model.hf_dir:" in proc.stderr, proc.stderr
    assert "models/Qwen1.5-7B/config.json does not exist" in proc.stderr
    refused = run("validate", cwd=tmp_path)
    assert refused.returncode == 2 and f"qwen.toml:{hf_line}: model.hf_dir:" in refused.stderr, refused.stderr
    # a refusal of set names where the key stands in the user's file, not in the edited text
    (tmp_path / "models" / "Qwen1.5-7B").mkdir(parents=True)
    (tmp_path / "models" / "Qwen1.5-7B" / "config.json").write_text('{"hidden_size": "big"}')
    before = path.read_text()
    refused = run("set", "model.hf_dir=models/Qwen1.5-7B", cwd=tmp_path)
    assert refused.returncode == 2 and f"qwen.toml:{hf_line}: model.hf_dir:" in refused.stderr, refused.stderr
    assert "key 'hidden_size': found string 'big'" in refused.stderr and path.read_text() == before


def test_set_writes_through_to_the_file_the_user_has(tmp_path):
    """A linked manifest is edited at its target, hard links see the edit, mode, CRLF endings and BOM are kept, a
    new key goes before the blank line that ends its table."""
    import os

    run("init", "--preset", "qwen1.5-72b", "-o", "real.toml", cwd=tmp_path)
    real = tmp_path / "real.toml"
    text = real.read_text()
    real.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    os.chmod(real, 0o600)
    (tmp_path / "qwen.toml").symlink_to("real.toml")
    os.link(real, tmp_path / "other.toml")
    proc = run("set", "train.seed=7", "hardware.nodes[0].device_ids=[0,1,2,3,4,5,6,7]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "qwen.toml").is_symlink() and os.stat(real).st_mode & 0o777 == 0o600
    data = real.read_bytes()
    assert data == (tmp_path / "other.toml").read_bytes() and data.startswith(b"\xef\xbb\xbf")
    edited = data[3:].decode()
    assert edited.count("\r\n") == edited.count("\n") and "seed = 7\r\n" in edited
    # only the two edited lines differ; the blank line after node 0's table is still there
    old, new = text.splitlines(), edited.splitlines()
    assert [line for line in new if line not in old] == ["device_ids = [0,1,2,3,4,5,6,7]", "seed = 7"]
    assert new.index("device_ids = [0,1,2,3,4,5,6,7]") + 2 == new.index("[[hardware.nodes]]", new.index(
        "device_ids = [0,1,2,3,4,5,6,7]"))
