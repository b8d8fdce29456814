"""MindFormers on the cluster, played against a built tree: its Trainer's own functions (output path, strategy save
path, checkpoint and log paths, auto_trans_ckpt's clearing) called with the arguments it passes them on Ascend,
read from the generated YAMLs, touch no artifact in qwen.lock; the finetune's merge takes the strategies MindFormers
compiled when there are any."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
CALLS = Path(__file__).resolve().with_name("ascend_trainer_calls.py")
HARDWARE = """[hardware]
device = "ascend"
devices_per_node = 4
device_memory_gb = 64
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
# every task that needs no training and no msrun, on the 2 x 4 Ascend topology (dp2 x mp2 x pp2, export mp 2)
TASKS = ["rank_table", "strategy", "shard", "launch", "run_config", "predict", "lite_ini", "lite_infer"]
# the module's tree is built through doit
pytestmark = pytest.mark.slow

# every test here reads one doit build of the 72B-shaped Ascend tree's weightless tasks
pytestmark = pytest.mark.slow


def ascend_manifest(directory: Path) -> Path:
    text = (REPO / "qwen.toml").read_text(encoding="utf-8")
    text = text[:text.index("[hardware]")] + HARDWARE + text[text.index("[parallel]"):]
    for old, new in (("num_train = 4000", "num_train = 300"), ("num_heldout = 200", "num_heldout = 20"),
                     ("model_parallel = 1", "model_parallel = 2"), ("pipeline_stage = 1", "pipeline_stage = 2"),
                     ("micro_batch_num = 1", "micro_batch_num = 2")):
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "qwen.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascend")
    manifest = ascend_manifest(root)
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *TASKS], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return manifest, root / "build"


def fresh_digests(build: Path) -> dict[tuple[str, str], str]:
    """Every artifact qwen.lock lists, hashed again now (no stat cache): (task, path) -> digest."""
    from qwenbuild.lock import describe_artifact

    lock = json.loads((build / "qwen.lock").read_text())
    return {(task, rel): describe_artifact(build / rel)[0]["digest"] if (build / rel).exists() else "missing"
            for task, entry in lock["tasks"].items() for rel in entry["artifacts"]}


def recorded_digests(build: Path) -> dict[tuple[str, str], str]:
    lock = json.loads((build / "qwen.lock").read_text())
    return {(task, rel): art["digest"] for task, entry in lock["tasks"].items()
            for rel, art in entry["artifacts"].items()}


def trainer_calls(mode: str, yaml_file: Path, ranks: int, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_DEFAULT_PATH", "RANK_ID", "RANK_SIZE")}
    proc = subprocess.run([sys.executable, str(CALLS), mode, str(yaml_file), str(ranks)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_what_mindformers_writes_and_clears_on_ascend_leaves_every_artifact_intact(built):
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.lock import Lock
    from qwenbuild.manifest import load_manifest
    from qwenbuild.tasks import task_specs
    from qwenbuild.tasks.staleness import stale_reasons

    manifest, build_root = built
    build = BuildDir(build_root)
    before = recorded_digests(build_root)
    assert set(TASKS) <= {t for t, _ in before} and fresh_digests(build_root) == before
    # the strategy and shard artifacts a MindFormers run on the old layout (output_dir: build/output) emptied
    assert len(list(build.strategy.glob("ckpt_strategy_rank_*.json"))) == 8
    assert len(list(build.transformed.glob("rank_*/checkpoint_*.ckpt"))) == 8

    finetune = trainer_calls("finetune", build.mindformers_yaml, 8, build_root)
    predict = trainer_calls("predict", build.predict_yaml, 2, build.predict)

    # MindFormers wrote where the README says its own outputs go: the finetune's under output/, the predict's
    # under predict/output/
    assert finetune["strategy_files"] == [str(build.compiled_strategy / f"ckpt_strategy_rank_{r}.ckpt")
                                          for r in range(8)]
    assert str(build.checkpoint / "rank_7") in finetune["checkpoint_dirs"]
    assert (build.output / "log" / "rank_7" / "mindformer.log").is_file()
    assert finetune["cleared"] == [str(build.output / "strategy"), str(build.output / "transformed_checkpoint")]
    assert predict["cleared"] == [str(build.predict_output / "strategy"),
                                  str(build.predict_output / "transformed_checkpoint")]
    assert predict["strategy_files"] == [str(build.predict_output / "strategy" / f"ckpt_strategy_rank_{r}.ckpt")
                                         for r in range(2)]
    assert predict["transformed"][1] == str(build.predict_output / "transformed_checkpoint" / "checkpoint_0" /
                                            "rank_1" / "checkpoint_1.ckpt")
    for path in finetune["strategy_files"] + predict["transformed"]:
        assert Path(path).is_file(), path
    # ... and every artifact in qwen.lock has the bytes it was built with, so nothing rebuilds
    assert fresh_digests(build_root) == before
    m = load_manifest(manifest)
    lock = Lock(build.lock)
    built_tasks = {t for t, _ in before}
    for spec in task_specs(m):
        if spec.name in built_tasks:
            assert stale_reasons(spec, m, build_root, lock) == [], spec.name


def compiled_strategy_file(json_file: Path, target: Path) -> None:
    """A JSON strategy file as MindSpore saves a compiled one on Ascend: a ParallelStrategyMap protobuf (.ckpt)."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    doc = json.loads(json_file.read_text())
    proto = ParallelStrategyMap()
    proto.current_stage = doc.get("current_stage", 0)
    for node, item in doc["parallel_strategy_item"].items():
        entry = proto.parallel_strategy_item.add()
        entry.node_name = node
        entry.parallel_strategys.stage = item["stage"]
        for dims in item["parallel_strategy"]:
            entry.parallel_strategys.parallel_strategy.add().dim.extend(dims)
    for name, layout in doc["parallel_layout_item"].items():
        entry = proto.parallel_layout_item.add()
        entry.param_name = name
        layouts = entry.parallel_layouts
        layouts.dev_matrix.add().dim.extend(layout["dev_matrix"])
        layouts.tensor_map.add().dim.extend(layout["tensor_map"])
        layouts.param_split_shape.add().dim.extend(layout.get("param_split_shape", []))
        layouts.indices_offset.add().dim.extend(layout.get("indices_offset", []))
        layouts.field = layout["field"]
        layouts.opt_weight_shard_step = layout["opt_weight_shard_step"]
        layouts.opt_weight_shard_size = layout["opt_weight_shard_size"]
    target.write_bytes(proto.SerializeToString())


def _weights(path: Path) -> dict[str, np.ndarray]:
    from qwenbuild.model.params import is_beside_weights
    from qwenbuild.weights.mindspore_ckpt import read_array, read_tensors

    return {t.name: read_array(t) for t in read_tensors(path) if not is_beside_weights(t.name)}


def test_the_merge_takes_the_strategies_mindformers_compiled(built, tmp_path):
    """Ranks trained under layouts MindFormers compiled (here: the embedding split, which the plan keeps whole)
    merge back to the same weights only by those layouts, which the finetune's merge takes over the plan's."""
    from qwenbuild.build_dir import BuildDir
    from qwenbuild.errors import UserError
    from qwenbuild.manifest import load_manifest
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.tasks import task_specs
    from qwenbuild.tasks.context import Context, DeclaredManifest
    from qwenbuild.tasks.train import finetune_strategies, merge_finetuned

    manifest, source = built
    # the tree as built, without what another test's MindFormers calls left in output/
    shutil.copytree(source, tmp_path / "build", symlinks=True, ignore=shutil.ignore_patterns("output"))
    m = load_manifest(manifest)
    build = BuildDir(tmp_path / "build")
    assert m.parallel.vocab_emb_dp
    layouts = write_strategy_files(m.model.config, 2, 2, 2, tmp_path / "compiled_json", vocab_emb_dp=False)
    build.compiled_strategy.mkdir(parents=True)
    for path in layouts:
        compiled_strategy_file(path, build.compiled_strategy / path.with_suffix(".ckpt").name)
    # what each rank's CheckpointMonitor saved: its slice of the weights by the compiled layout
    transform_ckpt(None, tmp_path / "compiled_json", build.converted, tmp_path / "ranks", progress=None)
    for rank in range(8):
        rank_dir = build.checkpoint / f"rank_{rank}"
        rank_dir.mkdir(parents=True)
        shutil.copyfile(tmp_path / "ranks" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt", rank_dir / "qwen-1_1.ckpt")
        (rank_dir / "meta.json").write_text(json.dumps({"last_ckpt_file": "qwen-1_1.ckpt"}))
    files, which = finetune_strategies(build, 8)
    assert which == "compiled" and [p.name for p in files] == [f"ckpt_strategy_rank_{r}.ckpt" for r in range(8)]
    spec = next(s for s in task_specs(m) if s.name == "finetune")
    ctx = Context("finetune", DeclaredManifest(m, "finetune", spec.keys), build)
    merge_finetuned(ctx, "checkpoints-digest")
    merged, converted = _weights(build.merged_file), _weights(build.converted)
    assert merged.keys() == converted.keys()
    assert all(np.array_equal(merged[name], converted[name]) for name in converted)
    # the plan's layouts do not describe these ranks: by them the vocabulary-split tensors would come out wrong, so
    # the merge refuses them, naming the tensor, before writing anything
    for path in build.compiled_strategy.glob("*.ckpt"):
        path.unlink()
    assert finetune_strategies(build, 8)[1] == "planned"
    before = build.merged_file.read_bytes()
    with pytest.raises(UserError, match=r"model\.tok_embeddings\.embedding_weight is \[256, 128\] by the shards in "
                                        r".*rank_0 and the source strategy, but the checkpoint's own config\.json "
                                        r"makes it \[512, 128\]"):
        merge_finetuned(ctx, "checkpoints-digest-2")
    assert build.merged_file.read_bytes() == before


def test_the_ascend_lite_launcher_starts_one_lite_process_per_export_rank(built):
    """lite_infer.sh of the 2 x 4 topology: msrun on node 0's first export.model_parallel cards with the export
    rank table, each rank running the original's run_qwen1_5_mslite_infer flags on MindSpore Lite."""
    import shlex

    from qwenbuild.build_dir import BuildDir

    _, build_root = built
    build = BuildDir(build_root)
    text = build.lite_infer_script.read_text()
    # it runs in build/lite_infer/, found from where it lies: every build path is relative to that directory
    assert 'cd "$(dirname -- "${BASH_SOURCE[0]}")"/.' in text.splitlines()
    assert "export RANK_TABLE_FILE=../export_rank_table.json" in text and "export RANK_SIZE=2" in text
    argv = shlex.split(next(line for line in text.splitlines() if line.startswith("exec ")))[1:]
    assert argv[:4] == ["python3", "-m", "mindspore.parallel.cluster.run", "--worker_num=2"]
    assert "--local_worker_num=2" in argv
    assert "--rank_table_file=../export_rank_table.json" in argv and "--log_dir=msrun_log" in argv
    flags = argv[argv.index("run_qwen1_5_mslite_infer") + 1:]
    assert flags[-1] == "--json"
    options = dict(zip(flags[:-1:2], flags[1:-1:2]))
    assert options == {"--mindir_root_dir": "../export", "--seq_length": "128", "--batch_size": "1",
                       "--do_sample": "False", "--vocab_file": "../tokenizer/vocab.json",
                       "--merge_file": "../tokenizer/merges.txt", "--ge_config_path": "../lite.ini",
                       "--predict_data": options["--predict_data"], "--max_new_tokens": "32", "--backend": "lite"}
    table = json.loads(build.export_rank_table.read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["10.1.0.1", "10.1.0.2"]
    assert f"rank_table_file={build.export_rank_table}" in build.lite_ini.read_text()
