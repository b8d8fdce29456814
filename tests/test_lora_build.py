"""LoRA trained for real: through `doit finetune` with both engines on a model of a shape no other build uses, what a
rank edit and a method switch rebuild, and the tensor-parallel layouts (and a resumed run) against each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tb_events
from faults import reduced_manifest, task_line

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")]
# 6 query heads over 2 KV heads of 16, FFN 160, 3 layers
SHAPE = [("model.hidden_size", "96"), ("model.num_heads", "6"), ("model.n_kv_heads", "2"),
         ("model.intermediate_size", "160"), ("model.num_layers", "3")]
TARGETS = '["q_proj", "o_proj", "up_proj"]'


def _doit(manifest: Path, *tasks) -> tuple[dict[str, str], str]:
    """({task: "." ran | "--" up to date}, stderr) of one doit run."""
    proc = subprocess.run(DOIT + [f"manifest={manifest}", *tasks], cwd=manifest.parent, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {line[1]: line[0] for line in map(task_line, proc.stdout.splitlines()) if line}, proc.stderr


def _tensors(path) -> dict[str, np.ndarray]:
    from qwenbuild.weights.mindspore_ckpt import read_array, read_tensors

    return {t.name: read_array(t) for t in read_tensors(path) if t.type_name != "str"}


def _logits_through_peft(build: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    base = Qwen2ForCausalLM.from_pretrained(build / "weights" / "hf_init", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, build / "adapter").eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _merged_logits(build: Path, ids: np.ndarray) -> np.ndarray:
    import mindspore as ms

    from qwenbuild.model.config import QwenConfig
    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.weights.mindspore_ckpt import load_weights

    ms.set_context(mode=ms.GRAPH_MODE)
    net = QwenForCausalLM(QwenConfig.from_hf_dir(build / "weights" / "hf_init"))
    load_weights(net, build / "output" / "merged_checkpoint" / "rank_0" / "checkpoint_0.ckpt")
    return net(ms.Tensor(ids)).asnumpy()


def _check_lora_result(build: Path, targets: tuple[str, ...], whole: bool = False) -> dict[str, np.ndarray]:
    """The merged checkpoint differs from the converted one exactly in the targets' weights; the rank
    checkpoints hold no frozen weight (MindFormers' hold its `whole` network: the frozen weights as they were);
    peft's logits with the PEFT adapter equal the merged model's."""
    from qwenbuild.model.lora import TARGETS as CELLS

    merged = _tensors(build / "output" / "merged_checkpoint" / "rank_0" / "checkpoint_0.ckpt")
    base = _tensors(build / "weights" / "qwen.ckpt")
    assert merged.keys() == base.keys()
    changed = {n for n in base if not np.array_equal(base[n], merged[n])}
    assert changed == {f"model.layers.{i}.{CELLS[t]}.weight" for i in range(3) for t in targets}
    for rank_dir in (build / "output" / "checkpoint").glob("rank_*"):
        meta = json.loads((rank_dir / "meta.json").read_text())
        saved = _tensors(rank_dir / meta["last_ckpt_file"])
        if whole:
            assert all(np.array_equal(saved[n], base[n]) for n in base), "a frozen weight changed"
        else:
            assert not set(saved) & set(base), "a frozen weight was saved"
        assert any(n.endswith("mindpet_delta_lora_b") for n in saved)
    ids = np.random.default_rng(0).integers(0, 500, (2, 13)).astype(np.int32)
    np.testing.assert_allclose(_merged_logits(build, ids), _logits_through_peft(build, ids), rtol=0, atol=1e-5)
    return merged


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from qwenbuild.manifest.edit import set_keys

    manifest = reduced_manifest(tmp_path_factory.mktemp("lora_build"))
    set_keys(manifest, SHAPE + [("train.steps", "2"), ("train.save_steps", "2"), ("dataset.num_heldout", "4"),
                                ("train.eval_max_new_tokens", "4"), ("train.engine", '"qwenbuild"')])
    return manifest


def test_full_then_lora_then_a_rank_edit_then_back_to_full(project):
    from qwenbuild.manifest.edit import set_keys

    build = project.parent / "build"
    merged = build / "output" / "merged_checkpoint" / "rank_0" / "checkpoint_0.ckpt"
    ran, _ = _doit(project, "finetune")
    full_bytes = merged.read_bytes()
    set_keys(project, [("train.method", '"lora"'), ("train.lora.rank", "4"), ("train.lora.targets", TARGETS)])
    ran, err = _doit(project, "finetune", "adapter")
    assert ran["finetune"] == "." and ran["convert"] == "--" and ran["mindrecord"] == "--"
    assert "shard: reusing" in err  # the adapters' layouts leave the weights' slices as they were
    assert "merged the adapters into 9 weight(s), scale alpha / rank = 16 / 4 = 4" in err
    assert "(by the planned strategy files)" in err
    _check_lora_result(build, ("q_proj", "o_proj", "up_proj"))
    # the LoRA run's events replaced the full run's: its own losses, then the held-out accuracy at its last step
    logged = tb_events.scalars(build / "output" / "tensorboard" / "rank_0")
    losses = json.loads((build / "output" / "metrics.json").read_text())["loss"]
    assert logged["loss"] == dict(enumerate(np.float32(losses).tolist(), start=1))
    accuracy = json.loads((build / "output" / "metrics.json").read_text())["heldout_accuracy"]
    assert logged["heldout-accuracy"] == {2: pytest.approx(accuracy)}
    # a rank edit: the run settings, the training and what follows, nothing before
    set_keys(project, [("train.lora.rank", "2")])
    ran, err = _doit(project, "finetune", "adapter")
    assert {t for t, state in ran.items() if state == "."} == {"run_config", "finetune", "adapter"}, ran
    assert json.loads((build / "adapter" / "adapter_config.json").read_text())["r"] == 2
    _check_lora_result(build, ("q_proj", "o_proj", "up_proj"))
    # back to a full fine-tune: its finished run is reused, not trained again
    set_keys(project, [("train.method", '"full"')])
    ran, err = _doit(project, "finetune")
    assert ran["finetune"] == "." and "reusing the finished full fine-tune" in err and "running" not in err
    assert merged.read_bytes() == full_bytes
    # the events were the LoRA run's: emptied, then only the held-out accuracy of the reused run
    assert set(tb_events.scalars(build / "output" / "tensorboard" / "rank_0")) == {"heldout-accuracy"}


def test_mindformers_trains_lora_from_the_generated_yaml(project):
    from mindformers.tools.register import MindFormerConfig

    from qwenbuild.manifest.edit import set_keys

    build = project.parent / "build"
    set_keys(project, [("train.method", '"lora"'), ("train.lora.rank", "4"), ("train.lora.targets", TARGETS),
                       ("train.engine", '"mindformers"')])
    ran, err = _doit(project, "finetune", "adapter")
    assert ran["finetune"] == "." and "mindformers_run: CPU" in err
    pet = MindFormerConfig(str(build / "run_qwen1_5.yaml")).model.model_config.pet_config
    assert (pet.lora_rank, pet.lora_alpha, pet.target_modules) == (4, 16, ".*wq|.*wo|.*w3")
    log = (build / "output" / "msrun_log" / "worker_0.log").read_text()
    assert log.count("loss:[") == 2
    # MindFormers' own events of the LoRA run, every rank
    tensorboard = build / "output" / "tensorboard"
    assert sorted(p.name for p in tensorboard.iterdir()) == ["rank_0", "rank_1"]
    assert sorted(tb_events.scalars(tensorboard / "rank_0")["loss"]) == [1, 2]
    _check_lora_result(build, ("q_proj", "o_proj", "up_proj"), whole=True)


STEPS = 8


def test_dp2_mp2_equals_dp2_mp1_and_a_resumed_run_the_whole_one(tmp_path):
    """With dropout on: the same per-step losses and adapters for both layouts, and a run killed after step 4 and
    resumed ends as the uninterrupted one."""
    sys.path.insert(0, str(REPO / "bench"))  # the benchmarks' synthetic rows
    from bench_train import synthetic_mindrecord

    from qwenbuild.manifest._presets import MODELS
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.model.lora import LoraConfig
    from qwenbuild.parallel.reshard import transform_ckpt
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.train.msrun import run_msrun
    from qwenbuild.train.settings import TrainSettings, write_run_json
    from qwenbuild.weights.convert import convert_weight
    from qwenbuild.weights.random_init import write_random_hf_model

    cfg = QwenConfig(**dict(MODELS["tiny"], num_layers=2))
    lora = LoraConfig(4, 8, 0.1, ("q_proj", "o_proj", "up_proj", "down_proj"))
    records = synthetic_mindrecord(tmp_path / "rows.mindrecord", 200, 24, cfg.vocab_size)
    write_random_hf_model(cfg, 0, tmp_path / "hf")
    convert_weight(tmp_path / "hf", tmp_path / "init.ckpt", progress=None)
    losses, adapters = {}, {}
    for mp in (1, 2):
        tag = f"mp{mp}"
        write_strategy_files(cfg, 2, mp, 1, tmp_path / tag / "strategy", vocab_emb_dp=False, lora_targets=lora.targets)
        transform_ckpt("", tmp_path / tag / "strategy", tmp_path / "init.ckpt", tmp_path / tag / "shards",
                       progress=None)
        settings = TrainSettings(model=cfg, train_data=records, output_dir=str(tmp_path / tag / "out"),
                                 seq_length=24, batch_size=4, learning_rate=3e-3, steps=STEPS, save_steps=STEPS // 2,
                                 data_parallel=2, model_parallel=mp, init_checkpoint=str(tmp_path / tag / "shards"),
                                 strategy_dir=str(tmp_path / tag / "strategy"), lora=lora)
        write_run_json(tmp_path / tag / "run.json", settings)
        run_msrun(2 * mp, tmp_path / tag / "run.json", tmp_path / tag / "logs")
        losses[tag] = json.loads((tmp_path / tag / "out" / "metrics.json").read_text())["loss"]
        adapters[tag] = _joined(tmp_path / tag)
    np.testing.assert_allclose(losses["mp2"], losses["mp1"], rtol=0, atol=1e-4)
    for name, value in adapters["mp1"].items():
        np.testing.assert_allclose(adapters["mp2"][name], value, rtol=0, atol=1e-5, err_msg=name)
    # killed after step 4: its step-8 files are gone; the resumed run ends where the whole run did
    out = tmp_path / "mp1" / "out" / "checkpoint"
    whole = {r: (out / f"rank_{r}" / f"qwen2_rank_{r}-1_8.ckpt").read_bytes() for r in (0, 1)}
    for r in (0, 1):
        (out / f"rank_{r}" / f"qwen2_rank_{r}-1_8.ckpt").unlink()
    run_msrun(2, tmp_path / "mp1" / "run.json", tmp_path / "mp1" / "logs_resumed")
    assert "resuming from step 4/8" in (tmp_path / "mp1" / "logs_resumed" / "worker_0.log").read_text()
    assert {r: (out / f"rank_{r}" / f"qwen2_rank_{r}-1_8.ckpt").read_bytes() for r in (0, 1)} == whole


def _joined(run: Path) -> dict[str, np.ndarray]:
    """The adapters of a run's last checkpoints joined by its strategy files."""
    from qwenbuild.model.lora import is_adapter
    from qwenbuild.parallel.reshard import transform_ckpt

    staging = run / "last"
    for rank_dir in sorted((run / "out" / "checkpoint").glob("rank_*")):
        meta = json.loads((rank_dir / "meta.json").read_text())
        (staging / rank_dir.name).mkdir(parents=True)
        (staging / rank_dir.name / "last.ckpt").symlink_to(rank_dir / meta["last_ckpt_file"])
    transform_ckpt(run / "strategy", None, staging, run / "joined", progress=None, keep=is_adapter)
    return _tensors(run / "joined" / "rank_0" / "checkpoint_0.ckpt")
