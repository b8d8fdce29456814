"""The command lines of the original Qwen1.5 README, copied as written with only their paths substituted, run
through `qwenbuild` (the original script's name is the subcommand)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import tiny_hf_model

QWENBUILD = [sys.executable, "-m", "qwenbuild"]
PROMPT = "帮助我制定一份去上海的旅游攻略"


def seed(line: str, cwd: Path, **paths) -> subprocess.CompletedProcess:
    """Run one README line: `python <dir>/<script>.py ARGS` becomes `qwenbuild <script> ARGS`."""
    for placeholder, path in paths.items():
        line = line.replace(placeholder, str(path))
    words = shlex.split(line)
    assert words[0] == "python" and words[1].endswith(".py")
    proc = subprocess.run(QWENBUILD + [Path(words[1]).stem, *words[2:]], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_weight_conversion_both_ways_as_the_readme_writes_it(tmp_path):
    model = tiny_hf_model(tmp_path / "hf", hidden=64, heads=2, n_kv_heads=2)
    seed("python research/qwen1_5/convert_weight.py --torch_ckpt_dir <torch_ckpt_dir> "
         "--mindspore_ckpt_path <mindspore_ckpt_path>", tmp_path, **{"<torch_ckpt_dir>": tmp_path / "hf",
                                                                      "<mindspore_ckpt_path>": tmp_path / "m.ckpt"})
    # a hidden size no published Qwen1.5 has: the checkpoint's own config is what makes this work
    seed("python convert_reversed.py --mindspore_ckpt_path /path/your.ckpt --torch_ckpt_path /path/your.bin",
         tmp_path, **{"/path/your.ckpt": tmp_path / "m.ckpt", "/path/your.bin": tmp_path / "your.bin"})
    state = torch.load(tmp_path / "your.bin", weights_only=True)
    expected = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
def test_data_chain_as_the_readme_writes_it(tmp_path, qwen_dir):
    import mindspore.dataset as ds

    rows = [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, move, sleep."},
            {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows), encoding="utf-8")
    seed("python qwen1_5/alpaca_converter.py --data_path path/alpaca_data.json "
         "--output_path /path/alpaca-data-messages.json", tmp_path,
         **{"path/alpaca_data.json": tmp_path / "alpaca_data.json",
            "/path/alpaca-data-messages.json": tmp_path / "messages.json"})
    first = json.loads((tmp_path / "messages.json").read_text().splitlines()[1])
    assert first["messages"][1] == {"role": "user", "content": "Translate to French: Good morning"}
    seed("python qwen1_5/qwen1_5_preprocess.py --input_glob /path/alpaca-data-messages.json "
         "--vocab_file /path/vocab.json --merges_file /path/merges.txt --seq_length 2048 "
         "--output_file /path/alpaca-messages.mindrecord", tmp_path,
         **{"/path/alpaca-data-messages.json": tmp_path / "messages.json", "/path/vocab.json": qwen_dir / "vocab.json",
            "/path/merges.txt": qwen_dir / "merges.txt",
            "/path/alpaca-messages.mindrecord": tmp_path / "alpaca-messages.mindrecord"})
    got = list(ds.MindDataset(str(tmp_path / "alpaca-messages.mindrecord"), shuffle=False)
               .create_dict_iterator(output_numpy=True, num_epochs=1))
    assert len(got) == 2 and got[0]["input_ids"].shape == (2049,)
    assert got[0]["input_ids"][0] == 151644 and (got[0]["target_ids"][got[0]["input_ids"] == 151643] == -100).all()


@pytest.mark.slow
def test_lite_inference_line_as_the_readme_writes_it(tmp_path, qwen_dir):
    """The MindSpore Lite command (seq_length 8192, --vocab_file/--merge_file, lite.ini) on the graphcell backend."""
    from qwenbuild.export.lite_ini import write_lite_ini
    from qwenbuild.infer.prompt import chat_text

    model = tiny_hf_model(tmp_path / "hf", vocab=151936, hidden=32, heads=2, n_kv_heads=2, max_positions=8192)
    subprocess.run(QWENBUILD + ["convert_weight", "--torch_ckpt_dir", str(tmp_path / "hf"), "--mindspore_ckpt_path",
                                str(tmp_path / "m.ckpt")], check=True, capture_output=True)
    subprocess.run(QWENBUILD + ["export", "--load_checkpoint", str(tmp_path / "m.ckpt"), "--torch_ckpt_dir",
                                str(tmp_path / "hf"), "--output_dir", str(tmp_path / "output"), "--seq_length", "8192",
                                "--tokenizer_dir", str(qwen_dir)], check=True, capture_output=True)
    write_lite_ini(tmp_path / "lite.ini")
    proc = seed("python run_qwen1_5_mslite_infer.py --mindir_root_dir output --seq_length 8192 --batch_size 1 "
                "--do_sample False --vocab_file /path/vocab.json --merge_file /path/merges.txt "
                f"--ge_config_path lite.ini --predict_data {PROMPT}", tmp_path,
                **{"/path/vocab.json": qwen_dir / "vocab.json", "/path/merges.txt": qwen_dir / "merges.txt"})
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(str(qwen_dir))
    ids = tok(chat_text(PROMPT), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=512, do_sample=False, eos_token_id=[151645, 151643],
                             pad_token_id=151643)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert proc.stdout.rstrip("\n") == expected
