"""qwen.toml loading: every kind of bad manifest names its key path and line; presets validate."""

from __future__ import annotations

import re

import pytest

from qwenbuild.manifest import ManifestError, load_manifest
from qwenbuild.manifest._presets import MODELS
from qwenbuild.manifest._template import manifest_text
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="qwen.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors(tmp_path, text) -> list[tuple[int, str, str]]:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    return [(p.line, p.key, p.message) for p in info.value.problems]


def default_text() -> str:
    return (REPO / "qwen.toml").read_text(encoding="utf-8")


def test_embedded_default_is_the_tiny_template():
    assert default_text() == manifest_text("tiny")


def test_embedded_default_validates_with_defaults_filled(tmp_path):
    m = load_manifest(write(tmp_path, default_text()))
    assert m.model.hidden_size == MODELS["tiny"]["hidden_size"]
    assert m.train.beta2 == 0.95  # a schema default
    assert m.build_dir == (tmp_path / "build").resolve()


@pytest.mark.parametrize("preset", list(MODELS))
def test_every_preset_validates(tmp_path, preset):
    m = load_manifest(write(tmp_path, manifest_text(preset)))
    assert m.model.num_layers == MODELS[preset]["num_layers"]


def test_72b_preset_reproduces_the_original_setup(tmp_path):
    m = load_manifest(write(tmp_path, manifest_text("qwen1.5-72b")))
    par = m.parallel
    assert (par.data_parallel, par.model_parallel, par.pipeline_stage, par.micro_batch_num) == (1, 8, 4, 48)
    assert len(m.hardware.nodes) == 4 and m.hardware.devices_per_node == 8
    assert m.hardware.device == "ascend" and m.dataset.seq_length == 2048
    assert (m.model.hidden_size, m.model.num_layers, m.model.vocab_size) == (8192, 80, 152064)


def test_72b_with_data_parallel_2_names_the_device_product(tmp_path):
    text = manifest_text("qwen1.5-72b").replace("data_parallel = 1", "data_parallel = 2")
    [(line, key, message)] = errors(tmp_path, text)
    assert key == "parallel.data_parallel"
    assert text.splitlines()[line - 1].startswith("data_parallel = 2")
    assert "= 64" in message and "32 devices" in message


def test_syntax_error_names_the_line(tmp_path):
    text = default_text().replace("seq_length = 128", "seq_length = = 128")
    [(line, key, message)] = errors(tmp_path, text)
    assert text.splitlines()[line - 1].startswith("seq_length = = 128")
    assert "TOML syntax error" in message


def test_wrong_type_unknown_key_and_range_reported_together(tmp_path):
    text = (default_text().replace("model_parallel = 1", "model_parallel = \"one\"")
            .replace("warmup_ratio = 0.05", "warmup_ratio = 1.5")
            .replace("pipeline_stage = 1", "pipeline_stage = 1\nmicro_batchnum = 4"))
    found = {key: (line, msg) for line, key, msg in errors(tmp_path, text)}
    assert set(found) == {"parallel.model_parallel", "train.warmup_ratio", "parallel.micro_batchnum"}
    lines = text.splitlines()
    assert lines[found["parallel.model_parallel"][0] - 1].startswith("model_parallel")
    assert "found string 'one', allowed: integer" in found["parallel.model_parallel"][1]
    assert "allowed: number >= 0 <= 1" in found["train.warmup_ratio"][1]
    assert "did you mean 'micro_batch_num'" in found["parallel.micro_batchnum"][1]
    assert lines[found["parallel.micro_batchnum"][0] - 1].startswith("micro_batchnum")


def test_missing_section_is_named(tmp_path):
    text = default_text()
    start = text.index("[train]")
    text = text[:start] + text[text.index("[export]"):]
    [(line, key, message)] = errors(tmp_path, text)
    assert (key, line) == ("train", 1) and "required" in message


def test_out_of_range_and_enum(tmp_path):
    text = re.sub(r"^batch_size = \d+  # per", "batch_size = 0  # per", default_text(), flags=re.M)
    text = text.replace('device = "cpu"', 'device = "gpu"')
    found = {key: msg for _, key, msg in errors(tmp_path, text)}
    assert "one of \"ascend\", \"cpu\"" in found["hardware.device"]
    assert "integer >= 1" in found["train.batch_size"]


def test_array_of_tables_key_path_and_ip_format(tmp_path):
    text = default_text().replace('ip = "127.0.0.1"', 'ip = "127.0.0.300"')
    [(line, key, message)] = errors(tmp_path, text)
    assert key == "hardware.nodes[0].ip" and "IPv4" in message
    assert text.splitlines()[line - 1].startswith("ip = ")


@pytest.mark.parametrize("edit, key, words", [
    (("num_heads", 6), "parallel.model_parallel", "num_heads 6 is not divisible"),
    (("vocab", None), "parallel.model_parallel", "vocab_size 1001 is not divisible"),
    (("layers", None), "parallel.pipeline_stage", "exceeds model.num_layers"),
    (("micro", None), "parallel.micro_batch_num", "below pipeline_stage"),
    (("export", None), "export.seq_length", "exceeds model.max_position_embeddings"),
    (("cpu_stages", None), "hardware.devices_per_node", "not a multiple of pipeline_stage 4"),
    (("cpu_mindformers", None), "train.engine", "MindFormers compiles model_parallel and pipeline_stage only on Ascend"),
])
def test_each_plan_rule(tmp_path, edit, key, words):
    def swap(text: str, *pairs: tuple[str, str]) -> str:
        # every edit changes the manifest: a pattern that is absent, or replaced by itself, fails here
        for old, new in pairs:
            assert old in text and old != new, (old, new)
            text = text.replace(old, new)
        return text

    text = swap(default_text(), ("devices_per_node = 2", "devices_per_node = 4"))
    kind, value = edit
    if kind == "num_heads":
        text = swap(text, ("data_parallel = 2", "data_parallel = 1"), ("model_parallel = 1", "model_parallel = 4"),
                    ('preset = "tiny"', 'preset = "tiny"\nnum_heads = 6\nn_kv_heads = 6\nhidden_size = 132\n'
                                        'intermediate_size = 360'))
        words = "num_heads 6 is not divisible"
    elif kind == "vocab":
        # data_parallel stays 2: dp2 x mp2 fills the 4 devices, so the vocabulary is the only problem
        text = swap(text, ("model_parallel = 1", "model_parallel = 2"), ("vocab_emb_dp = true", "vocab_emb_dp = false"),
                    ('preset = "tiny"', 'preset = "tiny"\nvocab_size = 1001'))
    elif kind == "layers":
        text = swap(text, ("data_parallel = 2", "data_parallel = 1"), ("pipeline_stage = 1", "pipeline_stage = 4"),
                    ("micro_batch_num = 1", "micro_batch_num = 4"),
                    ('preset = "tiny"', 'preset = "tiny"\nnum_layers = 2'))
    elif kind == "micro":
        text = swap(text, ("data_parallel = 2", "data_parallel = 1"), ("pipeline_stage = 1", "pipeline_stage = 4"))
    elif kind == "export":
        text = swap(text, ("data_parallel = 2", "data_parallel = 4"),
                    ("seq_length = 128\nbatch_size = 1", "seq_length = 1024\nbatch_size = 1"))
    elif kind == "cpu_stages":
        # 2 nodes x 2 devices, 4 stages: a node cannot start 2 / 4 workers
        text = swap(text, ("devices_per_node = 4", "devices_per_node = 2"), ("data_parallel = 2", "data_parallel = 1"),
                    ("pipeline_stage = 1", "pipeline_stage = 4"), ("micro_batch_num = 1", "micro_batch_num = 4"))
        text += '\n[[hardware.nodes]]\nhost = "node1"\nip = "127.0.0.2"\n'
    elif kind == "cpu_mindformers":
        text = swap(text, ("model_parallel = 1", "model_parallel = 2"),
                    ("[train]\n", '[train]\nengine = "mindformers"\n'))
    found = [(k, msg) for _, k, msg in errors(tmp_path, text)]
    assert any(k == key and words in msg for k, msg in found), found


def test_hf_dir_dimensions_win_and_disagreement_is_an_error(tmp_path):
    import json

    from qwenbuild.model import QwenConfig

    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = QwenConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=4, intermediate_size=128)
    (hf / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    text = default_text().replace('preset = "tiny"', 'hf_dir = "hf"').replace('init = "random"', 'init = "hf"')
    m = load_manifest(write(tmp_path, text))
    assert (m.model.hidden_size, m.model.num_layers) == (64, 2)
    [(line, key, message)] = errors(tmp_path, text.replace('hf_dir = "hf"', 'hf_dir = "hf"\nhidden_size = 128'))
    assert key == "model.hidden_size" and "config.json says 64" in message


def test_not_utf8_and_missing_file(tmp_path):
    from qwenbuild.errors import UserError

    path = tmp_path / "qwen.toml"
    path.write_bytes(b"[model]\npreset = \"\xff\"\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_manifest(path)
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "nope.toml")


@pytest.mark.parametrize("between", ["", "# a comment\n", "\n"])
def test_a_key_written_twice_is_named_at_its_second_line(tmp_path, between):
    text = default_text().replace("num_train = 4000\n", f"num_train = 4000\n{between}num_train = 10\n")
    second = text.splitlines().index("num_train = 10") + 1
    [(line, key, message)] = errors(tmp_path, text)
    assert line == second and "each key may be written once" in message and "cannot" not in message


def test_a_table_written_twice_is_named_at_its_second_header(tmp_path):
    text = default_text() + "\n[train]\nseed = 3\n"
    [(line, _, message)] = errors(tmp_path, text)
    assert line == len(text.splitlines()) - 1 and "Cannot declare ('train',) twice" in message


def test_a_byte_order_mark_is_read_past_and_lines_still_count_from_it(tmp_path):
    """Editors on Windows write one: the manifest reads as without it, and errors name the same lines."""
    m = load_manifest(write(tmp_path, "\ufeff" + default_text()))
    assert m.model.hidden_size == MODELS["tiny"]["hidden_size"]
    plain = errors(tmp_path, default_text().replace("seq_length = ", "seq_length = -", 1))
    assert errors(tmp_path, "\ufeff" + default_text().replace("seq_length = ", "seq_length = -", 1)) == plain
    assert plain[0][1] == "dataset.seq_length"
