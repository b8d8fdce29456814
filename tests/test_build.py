"""The doit build graph on real tasks: what reruns after an edit, no-op runs, kill -9, corruption, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]


def small_manifest(tmp_path: Path) -> Path:
    text = (REPO / "qwen.toml").read_text(encoding="utf-8")
    text = text.replace("num_train = 4000", "num_train = 300").replace("num_heldout = 200", "num_heldout = 20")
    path = tmp_path / "qwen.toml"
    path.write_text(text, encoding="utf-8")
    return path


def doit(manifest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *args], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def ran(proc) -> list[str]:
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]


def skipped(proc) -> list[str]:
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith("-- ")]


DATA_CHAIN = ["dataset", "alpaca", "tokenizer", "mindrecord"]


@pytest.fixture
def built(tmp_path):
    manifest = small_manifest(tmp_path)
    first = doit(manifest, "mindrecord")
    assert ran(first) == DATA_CHAIN
    return manifest


def lock(manifest: Path) -> dict:
    return json.loads((manifest.parent / "build" / "qwen.lock").read_text())


@pytest.mark.slow
def test_noop_run_executes_nothing(built):
    again = doit(built, "mindrecord")
    assert ran(again) == [] and skipped(again) == DATA_CHAIN


@pytest.mark.slow
def test_lock_records_artifacts_inputs_and_manifest_slice(built):
    entry = lock(built)["tasks"]["mindrecord"]
    from qwenbuild.manifest import load_manifest

    ds = load_manifest(built).dataset
    assert entry["manifest"] == {"dataset.seq_length": ds.seq_length, "dataset.mask_prompt": ds.mask_prompt,
                                 "dataset.file_partition": 1}
    assert set(entry["inputs"]) == {"data/alpaca-messages.json", "tokenizer"}
    assert entry["inputs"]["data/alpaca-messages.json"] == \
        lock(built)["tasks"]["alpaca"]["artifacts"]["data/alpaca-messages.json"]["digest"]
    members = entry["artifacts"]["data/mindrecord"]["members"]
    assert set(members) == {"alpaca-messages.mindrecord", "alpaca-messages.mindrecord.db"}
    assert entry["toolchain"]["mindspore"] == "2.9.0"
    assert "machine" not in entry  # its bytes follow from the inputs on any CPU
    # the manifest's reader, its schema checker and doit are in every task's toolchain, at the locked versions
    locked = dict(line.split(" ")[0].split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith((" ", "#")))
    for package in ("tomlkit", "jsonschema", "doit"):
        assert entry["toolchain"][package] == locked[package]
        assert lock(built)["tasks"]["dataset"]["toolchain"][package] == locked[package]


@pytest.mark.slow
def test_editing_one_key_reruns_exactly_the_dependent_tasks(built):
    from qwenbuild.manifest.edit import set_keys

    set_keys(built, [("dataset.seq_length", "56")])
    assert ran(doit(built, "mindrecord")) == ["mindrecord"]
    set_keys(built, [("tokenizer.vocab_size", "400")])  # below what the data supports
    assert ran(doit(built, "mindrecord")) == ["tokenizer", "mindrecord"]


@pytest.mark.slow
def test_corrupted_artifact_is_rebuilt_and_identical(built):
    target = built.parent / "build" / "data" / "alpaca-messages.json"
    good = target.read_bytes()
    with open(target, "r+b") as f:
        f.seek(10)
        f.write(b"X")
    again = doit(built, "mindrecord")
    # the rebuilt file has the recorded bytes again, so nothing downstream reruns
    assert ran(again) == ["alpaca"]
    assert target.read_bytes() == good


@pytest.mark.slow
def test_a_write_that_puts_the_mtime_back_is_still_seen(built):
    target = built.parent / "build" / "data" / "alpaca-messages.json"
    good, before = target.read_bytes(), target.stat()
    with open(target, "r+b") as f:
        f.seek(10)
        f.write(bytes([good[10] ^ 0xFF]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert ran(doit(built, "mindrecord")) == ["alpaca"]
    assert target.read_bytes() == good


@pytest.mark.slow
def test_an_identical_copy_is_hashed_once_then_trusted_again(built):
    target = built.parent / "build" / "data" / "alpaca-messages.json"
    copy = target.with_name("copy.json")
    copy.write_bytes(target.read_bytes())
    os.replace(copy, target)
    stats_file = built.parent / "build" / "qwen.lock.stat"
    assert json.loads(stats_file.read_text())[str(target)][3] != target.stat().st_ino
    assert ran(doit(built, "mindrecord")) == []
    # the confirmed bytes refreshed the cache: the next check trusts the new inode without reading
    assert json.loads(stats_file.read_text())[str(target)][3] == target.stat().st_ino


@pytest.mark.slow
def test_corrupted_member_of_a_directory_artifact_is_rebuilt(built):
    target = built.parent / "build" / "tokenizer" / "merges.txt"
    good = target.read_bytes()
    target.write_bytes(good[:-5])
    assert ran(doit(built, "mindrecord")) == ["tokenizer"]
    assert target.read_bytes() == good


@pytest.mark.slow
def test_kill_9_during_a_task_leaves_no_artifact_and_the_next_run_completes(tmp_path):
    manifest = small_manifest(tmp_path)
    doit(manifest, "tokenizer")
    mindrecord = tmp_path / "build" / "data" / "mindrecord"
    proc = subprocess.Popen(DOIT + [f"manifest={manifest}", "mindrecord"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith(".  mindrecord"):
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert not mindrecord.exists()
    again = doit(manifest, "mindrecord")
    assert ran(again) == ["mindrecord"]
    assert (mindrecord / "alpaca-messages.mindrecord").is_file()
    assert not list(mindrecord.parent.glob(".mindrecord.tmp-*"))


@pytest.mark.slow
def test_two_concurrent_builds_are_safe(tmp_path):
    manifest = small_manifest(tmp_path)
    procs = [subprocess.Popen(DOIT + [f"manifest={manifest}", "mindrecord"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = [[line[3:] for line in o.splitlines() if line.startswith(".  ")] for o, _ in outs]
    # one build did the work; the other waited for it and found everything up to date
    assert sorted(runs, key=len) == [[], DATA_CHAIN]
    assert any("waiting for it to finish" in err for _, err in outs)
    assert ran(doit(manifest, "mindrecord")) == []


@pytest.mark.slow
def test_plan_reports_why_tasks_are_out_of_date(built):
    from qwenbuild.manifest import load_manifest
    from qwenbuild.manifest.edit import set_keys
    from qwenbuild.tasks.staleness import task_status

    before = load_manifest(built).dataset.mask_prompt
    set_keys(built, [("dataset.mask_prompt", "false" if before else "true")])
    status = {name: (state, reasons) for name, state, reasons in task_status(load_manifest(built))}
    assert status["dataset"] == ("up to date", [])
    assert status["mindrecord"] == ("will run", [f"dataset.mask_prompt: {before} -> {not before}"])
    assert status["init_weights"][1] == ["not built yet"]


def test_bad_manifest_stops_doit_with_the_error(tmp_path):
    manifest = small_manifest(tmp_path)
    manifest.write_text(manifest.read_text().replace("data_parallel = 2", "data_parallel = 3"))
    proc = doit(manifest, "mindrecord", check=False)
    assert proc.returncode == 2
    assert "parallel.data_parallel" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sharded_mindrecord_is_what_run_json_and_the_yaml_train_on(tmp_path):
    import mindspore.dataset as ds
    import yaml

    from qwenbuild.manifest.edit import set_keys

    manifest = small_manifest(tmp_path)
    set_keys(manifest, [("dataset.file_partition", "2")])
    doit(manifest, "mindrecord", "run_config")
    build = tmp_path / "build"
    run = json.loads((build / "run.json").read_text())
    config = yaml.safe_load((build / "run_qwen1_5.yaml").read_text())
    assert run["train_data"] == config["train_dataset"]["data_loader"]["dataset_dir"]
    assert run["train_data"].endswith("alpaca-messages.mindrecord0")
    # MindDataset reads every shard from the first one: all 300 training conversations
    # run.json names its files relative to the build dir, where it lies and the launch scripts run
    assert ds.MindDataset(str(build / run["train_data"]), shuffle=False).get_dataset_size() == 300


@pytest.mark.slow
def test_a_checkpoint_not_downloaded_yet_stops_only_the_weight_tasks(tmp_path):
    manifest = small_manifest(tmp_path)
    manifest.write_text(manifest.read_text().replace('init = "random"', 'hf_dir = "models/Qwen1.5-tiny"'))
    from qwenbuild.cli import main

    assert main(["validate", "-c", str(manifest)]) == 2
    planned = doit(manifest, "strategy", "launch", "run_config")
    assert {"strategy", "launch", "run_config"} <= set(ran(planned))
    refused = doit(manifest, "convert", check=False)
    assert refused.returncode != 0 and "models/Qwen1.5-tiny" in refused.stderr and "config.json" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "build" / "weights").exists()


def status(manifest: Path) -> dict[str, str]:
    """`doit list --status`: task -> R (would run) or U (up to date)."""
    out = doit(manifest, "list", "--status").stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines() if line[:2] in ("R ", "U ", "I ")}


@pytest.mark.slow
def test_doit_export_builds_the_graphs_lite_ini_and_the_lite_launcher(tmp_path):
    from qwenbuild.parallel.launch_scripts import free_port

    manifest = small_manifest(tmp_path)
    manifest.write_text(manifest.read_text().replace('checkpoint = "finetuned"', 'checkpoint = "converted"'))
    assert status(manifest)["export"] == "R"
    proc = doit(manifest, "export", "infer")
    assert {"mindir", "lite_ini", "lite_infer", "infer"} <= set(ran(proc))
    build = tmp_path / "build"
    assert (build / "lite.ini").is_file()
    assert (build / "export" / "mindir_inc_checkpoint" / "rank_1_graph.mindir").is_file()
    again = doit(manifest, "export")
    assert ran(again) == [] and "export" in skipped(again)
    assert status(manifest)["export"] == "U"
    # the original's Lite run, one process per export rank with its flags: here GraphCell, the infer task's tokens
    script = build / "lite_infer" / "lite_infer.sh"
    # it runs in build/lite_infer/, found from where it lies, whatever the caller's directory
    assert "run_qwen1_5_mslite_infer --mindir_root_dir ../export " in script.read_text()
    run = subprocess.run(["bash", str(script)], env=dict(os.environ, MASTER_PORT=str(free_port())),
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    expected = json.loads((build / "infer" / "answer.json").read_text())
    for rank in (0, 1):
        log = (build / "lite_infer" / "msrun_log" / f"worker_{rank}.log").read_text()
        answer = json.loads(next(line for line in log.splitlines() if line.startswith('{"prompt_ids"')))
        assert answer["backend"] == "graphcell" and answer["generated_ids"] == expected["generated_ids"], rank
        assert answer["prompt_ids"] == expected["prompt_ids"] and answer["text"] == expected["text"]
    # one member out of date: the group is too, and `doit export` runs that member alone
    (build / "lite.ini").write_text((build / "lite.ini").read_text() + "\n")
    stale = status(manifest)
    assert (stale["export"], stale["lite_ini"], stale["mindir"], stale["lite_infer"]) == ("R", "R", "U", "U")
    assert ran(doit(manifest, "export")) == ["lite_ini"]
    assert status(manifest)["export"] == "U"
