"""Task specs against the schema, the declared-keys view of the manifest, and the one staleness rule."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from qwenbuild import schema
from qwenbuild.build_dir import BuildDir
from qwenbuild.lock import Lock
from qwenbuild.manifest import load_manifest
from qwenbuild.manifest._template import manifest_text
from qwenbuild.manifest.sections import SECTIONS
from qwenbuild.tasks import task_specs
from qwenbuild.tasks.context import Context, DeclaredManifest, UndeclaredKey
from qwenbuild.tasks.spec import TaskSpec
from qwenbuild.tasks.staleness import build_order, stale_reasons

REPO = Path(__file__).resolve().parents[1]
ASCEND = """
[hardware]
device = "ascend"
devices_per_node = 4
master_port = 8118

[[hardware.nodes]]
host = "npu0"
ip = "10.0.0.1"
device_ips = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]

[[hardware.nodes]]
host = "npu1"
ip = "10.0.0.2"
device_ips = ["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.4"]
"""


def manifests(tmp_path) -> dict[str, Path]:
    """The embedded default, an Ascend tiny topology (2 x 4, dp2 mp2 pp2), an alpaca one, and every preset."""
    default = (REPO / "qwen.toml").read_text(encoding="utf-8")
    hardware = default[default.index("[hardware]"):default.index("[parallel]")]
    ascend = default.replace(hardware, ASCEND.lstrip() + "\n").replace("model_parallel = 1", "model_parallel = 2") \
        .replace("pipeline_stage = 1", "pipeline_stage = 2").replace("micro_batch_num = 1", "micro_batch_num = 2")
    (tmp_path / "alpaca.json").write_text("[]")
    alpaca = default.replace('source = "builtin"', 'source = "alpaca"\npath = "alpaca.json"')
    texts = {"default": default, "ascend": ascend, "alpaca": alpaca,
             **{preset: manifest_text(preset) for preset in ("qwen1.5-7b", "qwen1.5-72b")}}
    out = {}
    for name, text in texts.items():
        (tmp_path / name).mkdir()
        out[name] = tmp_path / name / "qwen.toml"
        out[name].write_text(text, encoding="utf-8")
    (tmp_path / "alpaca" / "alpaca.json").write_text("[]")
    return out


def test_sections_are_the_schema_keys():
    for name, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(schema.schema()["properties"][name]["properties"]), name
    assert set(SECTIONS) == set(schema.schema()["properties"])


def test_every_declared_key_is_a_schema_key(tmp_path):
    for name, path in manifests(tmp_path).items():
        for spec in task_specs(load_manifest(path)):
            unknown = [k for k in spec.keys if not schema.is_key(k)]
            assert not unknown, (name, spec.name, unknown)


def test_the_view_refuses_an_undeclared_key(tmp_path):
    m = load_manifest(manifests(tmp_path)["default"])
    view = DeclaredManifest(m, "probe", ("train.seed", "lite", "hardware.nodes"))
    assert view.train.seed == 42 and view.lite.ge_session_options == {} and len(view.hardware.nodes) == 1
    with pytest.raises(UndeclaredKey, match="probe.*train.learning_rate"):
        view.train.learning_rate
    with pytest.raises(UndeclaredKey, match="hardware.devices_per_node"):
        view.hardware.device_count  # a property needs every key it is computed from
    with pytest.raises(UndeclaredKey, match="model"):
        view.model.config
    with pytest.raises(UndeclaredKey):
        view.value("dataset.seq_length")
    with pytest.raises(KeyError, match="not a qwen.toml key"):
        m.value("train.learnig_rate")


def test_actions_of_a_cluster_topology_read_only_declared_keys(tmp_path, qwen_dir):
    """Run every task that needs no earlier artifact on the Ascend topology: an undeclared read would raise."""
    m = load_manifest(manifests(tmp_path)["ascend"])
    build = BuildDir(m.build_dir)
    build.tokenizer.parent.mkdir(parents=True)
    build.tokenizer.symlink_to(qwen_dir)
    ran = []
    for spec in build_order(task_specs(m)):
        if spec.name in ("rank_table", "strategy", "launch", "run_config", "lite_ini", "dataset", "init_weights",
                         "predict"):
            spec.action(Context(spec.name, DeclaredManifest(m, spec.name, spec.keys), build))
            ran.append(spec.name)
    assert ran == ["dataset", "init_weights", "rank_table", "strategy", "launch", "run_config", "lite_ini", "predict"]
    assert (build.rank_table / "hccl_2s_8p.json").is_file() and (build.launch / "node_1.sh").is_file()
    assert len(list(build.strategy.glob("ckpt_strategy_rank_*.json"))) == 8
    # the export topology (export.model_parallel = 2 on node 0) has its own rank table, which lite.ini names
    export_table = json.loads(build.export_rank_table.read_text())
    assert export_table["server_count"] == "1" and [(d["device_ip"], d["rank_id"]) for d in
                                                     export_table["server_list"][0]["device"]] == \
        [("10.1.0.1", "0"), ("10.1.0.2", "1")]
    assert f"rank_table_file={build.export_rank_table}" in build.lite_ini.read_text()
    # online predict: MindFormers reads the YAML; the script runs msrun on the export topology's cards with the
    # predict environment of the original README
    from mindformers.tools.register import MindFormerConfig

    config = MindFormerConfig(str(build.predict / "predict_qwen1_5.yaml"))
    assert (config.run_mode, config.use_parallel, config.auto_trans_ckpt) == ("predict", True, True)
    # every path is relative to build/predict/, where predict.sh runs: a copied project names its own files
    assert config.load_checkpoint == "../output/merged_checkpoint/rank_0/checkpoint_0.ckpt"
    assert config.output_dir == "output" and config.processor.tokenizer.vocab_file == "../tokenizer/vocab.json"
    assert config.model.model_config.use_past is True
    assert config.model.model_config.seq_length == m.export.seq_length
    expected = {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1, "use_seq_parallel": False,
                "micro_batch_num": 1, "vocab_emb_dp": True, "gradient_aggregation_group": 4}
    assert {k: config.parallel_config[k] for k in expected} == expected  # MindFormers adds its own defaults
    assert (build.predict / config.processor.tokenizer.vocab_file).is_file()
    script = (build.predict / "predict.sh").read_text()
    for line in ("export MS_GE_TRAIN=0", "export MS_ENABLE_GE=1", "export MS_ENABLE_REF_MODE=1",
                 f"export RANK_TABLE_FILE=../{build.export_rank_table.name}", "--worker_num=2", "--run_mode predict",
                 "--config predict_qwen1_5.yaml", "--log_dir=output/msrun_log",
                 'cd "$(dirname -- "${BASH_SOURCE[0]}")"/.'):
        assert line in script, line


def test_task_actions_never_reach_past_the_view():
    for area in ("data", "weights", "distributed", "train", "deploy"):
        text = (REPO / "qwenbuild" / "tasks" / f"{area}.py").read_text(encoding="utf-8")
        assert not re.search(r"_manifest\b|load_manifest|\.data\[", text), area


def _probe(tmp_path, source_text: str):
    """(manifest, build root, input file, a task writing train.seed to build/out.txt from that input)."""
    m = load_manifest(manifests(tmp_path)["default"])
    root = tmp_path / "build"
    root.mkdir()
    source = tmp_path / "source.txt"
    source.write_text(source_text)

    def action(ctx):
        (root / "out.txt").write_text(str(ctx.manifest.train.seed))
    return m, root, source, TaskSpec("probe", "", action, keys=("train.seed",), outputs=[root / "out.txt"],
                                     inputs=[source])


def test_stale_reasons_name_each_change(tmp_path):
    from qwenbuild.tasks.doit_tasks import run_task

    m, root, source, spec = _probe(tmp_path, "one")
    lock = Lock(root / "qwen.lock")
    assert stale_reasons(spec, m, root, lock) == ["not built yet"]
    assert run_task(spec, m, BuildDir(root)) is None
    assert stale_reasons(spec, m, root, lock) == []
    entry = lock.entry("probe")
    assert entry["manifest"] == {"train.seed": 42} and entry["inputs"] == {str(source): entry["inputs"][str(source)]}
    source.write_text("two")
    assert stale_reasons(spec, m, root, lock) == [f"input {source} changed"]
    source.write_text("one")
    assert stale_reasons(spec, m, root, lock) == []
    (root / "out.txt").write_text("43")
    assert stale_reasons(spec, m, root, lock) == [f"{root / 'out.txt'} changed since it was built "
                                                  "(digest differs from qwen.lock)"]
    (root / "out.txt").write_text("42")
    other = dataclasses.replace(m, train=dataclasses.replace(m.train, seed=7))
    assert stale_reasons(spec, other, root, lock) == ["train.seed: 42 -> 7"]
    source.unlink()
    assert stale_reasons(spec, m, root, lock) == [f"input {source} is missing"]


def test_an_unchanged_input_file_is_not_read_again(tmp_path, monkeypatch):
    from qwenbuild.tasks import staleness
    from qwenbuild.tasks.doit_tasks import run_task

    m, root, source, spec = _probe(tmp_path, "bytes")
    run_task(spec, m, BuildDir(root))
    read = []
    monkeypatch.setattr(staleness, "file_digest", lambda p: read.append(p) or "sha256:x")
    assert stale_reasons(spec, m, root, Lock(root / "qwen.lock")) == []
    assert read == []
    stats = json.loads((root / "qwen.lock.stat").read_text())
    assert str(source.resolve()) in stats


def test_the_default_infer_question_is_a_held_out_one(tmp_path):
    from qwenbuild.data.alpaca import user_text
    from qwenbuild.data.instructions import write_instruction_dataset
    from qwenbuild.infer.prompt import SEED_PROMPT
    from qwenbuild.tasks.deploy import _question

    paths = manifests(tmp_path)
    m = load_manifest(paths["default"])
    build = BuildDir(m.build_dir)
    write_instruction_dataset(build.dataset, seed=0, num_train=50, num_heldout=5)
    [spec] = [s for s in task_specs(m) if s.name == "infer"]
    assert build.dataset in spec.inputs
    prompt, expected = _question(Context("infer", DeclaredManifest(m, "infer", spec.keys), build))
    row = json.loads(build.heldout.read_text())[0]
    assert (prompt, expected) == (user_text(row["instruction"], row.get("input", "")), row["output"])
    alpaca = load_manifest(paths["alpaca"])
    [spec] = [s for s in task_specs(alpaca) if s.name == "infer"]
    view = DeclaredManifest(alpaca, "infer", spec.keys)
    assert _question(Context("infer", view, BuildDir(alpaca.build_dir))) == (SEED_PROMPT, None)


def test_the_compiled_strategy_dir_holds_only_what_a_finetune_wrote(tmp_path):
    """output/strategy is the finetune's sealed artifact: an earlier run's compiled strategies are cleared, anything
    else in it is refused by name before training, never sealed into the artifact or deleted."""
    from qwenbuild.errors import UserError
    from qwenbuild.store import write_seal
    from qwenbuild.tasks.train import clear_compiled_strategies

    compiled = tmp_path / "output" / "strategy"
    clear_compiled_strategies(compiled)  # not there yet
    compiled.mkdir(parents=True)
    (compiled / "ckpt_strategy_rank_0.ckpt").write_bytes(b"earlier run")
    write_seal(compiled)
    clear_compiled_strategies(compiled)
    assert sorted(p.name for p in compiled.iterdir()) == [".qwenbuild-seal.json"]
    (compiled / "ckpt_strategy_rank_1.ckpt").write_bytes(b"a killed run, unsealed")
    (compiled / "notes.txt").write_bytes(b"the user's")
    with pytest.raises(UserError, match=r"strategy holds what qwenbuild did not write there \(notes\.txt\)"):
        clear_compiled_strategies(compiled)
    assert sorted(p.name for p in compiled.iterdir()) == [".qwenbuild-seal.json", "notes.txt"]
    assert (compiled / "notes.txt").read_bytes() == b"the user's"
    link = tmp_path / "elsewhere"
    link.symlink_to(compiled)
    with pytest.raises(UserError, match="is a symbolic link"):
        clear_compiled_strategies(link)
    assert (compiled / "notes.txt").exists()
