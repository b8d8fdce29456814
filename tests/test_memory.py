"""The memory model: its parameter, gradient and optimizer bytes against MindFormers' own network, optimizer and
pipeline wrapper built from the generated YAML (nothing compiled, which CPU cannot do), the seed's figures, the YAML's
max_device_memory, and the export topology that `validate` refuses when a card cannot hold it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwenbuild.build_dir import BuildDir
from qwenbuild.manifest import ManifestError, load_manifest
from qwenbuild.model.config import QwenConfig
from qwenbuild.parallel import memory as mem
from qwenbuild.parallel.plan_rules import stage_layers
from qwenbuild.plan import export_memory, memory_estimate, memory_warnings
from qwenbuild.tasks.train import run_settings
from qwenbuild.train.mindformers_yaml import RunYaml, mindformers_config, write_yaml

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
QWEN72B = QwenConfig(vocab_size=152064, hidden_size=8192, num_layers=80, num_heads=64, n_kv_heads=64,
                     intermediate_size=24576, param_dtype="bfloat16", compute_dtype="bfloat16")
SEED = mem.TrainingPlan(data_parallel=1, model_parallel=8, pipeline_stage=4, micro_batch_num=48, vocab_emb_dp=True,
                        use_seq_parallel=True, recompute=True, seq_length=2048, batch_size=2, weight_dtype="float32",
                        compute_dtype="bfloat16", flash_attention=True, parallel_optimizer=True)

# MindFormers' LlamaForCausalLM, its AdamW and (pipeline) MFPipelineWithLossScaleCell from a generated YAML, as its
# Trainer builds them: per parameter its shape, dtype, pipeline stage and the split its primitive declares
MINDFORMERS = r'''
import json, sys
import mindspore as ms
from mindformers.core.optim import build_optim
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
from mindformers.modules.transformer import TransformerOpParallelConfig, op_parallel_config
from mindformers.pet import get_pet_model
from mindformers.tools.register import MindFormerConfig
from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters
from mindformers.wrapper import build_wrapper
import mindformers.wrapper.wrapper as wrapper

def allocated(path):
    config = MindFormerConfig(path)
    par = config.parallel_config
    dp, mp, pp = par.data_parallel, par.model_parallel, par.pipeline_stage
    # nothing is compiled: the communication group MindFormers asks for is the plan's, without msrun
    op_parallel_config.D.get_group_size = lambda *a, **k: dp * mp * pp
    wrapper.get_rank, wrapper.get_group_size, wrapper.create_group = (lambda *a: 0), (lambda *a: dp * mp * pp), \
        (lambda *a: None)
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=dp * mp * pp, pipeline_stages=pp,
                                 full_batch=True)
    model_config = {k: v for k, v in config.model.model_config.items() if k != "type"}
    model_config["parallel_config"] = TransformerOpParallelConfig(
        data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=par.micro_batch_num,
        vocab_emb_dp=par.vocab_emb_dp, use_seq_parallel=par.use_seq_parallel)
    net = LlamaForCausalLM(LlamaConfig(**model_config))
    if "pet_config" in config.model.model_config:
        # LoRA as the Trainer adds it: adapters sharded by their Linear's matmul strategy, the rest frozen
        net = get_pet_model(net, config.model.model_config.pet_config)
    stages, params = {}, {}
    for name, cell in net.cells_and_names():
        if hasattr(cell, "pipeline_stage"):
            stages[name] = cell.pipeline_stage
        for attr, p in cell._params.items():
            split = [1] * len(p.shape)
            for prim_name, index in {"weight": [("matmul", 1)], "bias": [("bias_add", 1)],
                                     "embedding_weight": [("gather", 0)],
                                     "mindpet_delta_lora_a": [("lora_a_matmul", 1)],
                                     "mindpet_delta_lora_b": [("lora_b_matmul", 1)]}.get(attr, []):
                prim = getattr(cell, prim_name, None)
                if prim is not None and "in_strategy" in prim.attrs:
                    split = list(prim.attrs["in_strategy"][index])
            owner = max((c for c in stages if name == c or name.startswith(c + ".")), key=len, default=None)
            # without pipeline stages MindFormers gives norm_out and lm_head none: they are on the one stage
            stage = 0 if owner is None and pp == 1 else stages[owner]
            params[p.name] = {"shape": list(p.shape), "dtype": str(p.dtype), "stage": stage, "split": split}
    groups = get_optimizer_grouped_parameters(model=net, weight_decay=config.optimizer.weight_decay)
    optimizer = build_optim(config.optimizer, default_args={"params": groups, "learning_rate": 1e-5})
    states = list(optimizer.exp_avg) + list(optimizer.exp_avg_sq)
    accu = []
    if pp > 1:
        # the Trainer's wrapper under pipeline parallel, with the YAML's runner_wrapper settings
        wrapped = build_wrapper(dict(config.runner_wrapper, type="MFPipelineWithLossScaleCell", scale_sense=1.0,
                                     micro_batch_num=par.micro_batch_num),
                                default_args={"network": net, "optimizer": optimizer})
        accu = list(wrapped.accu_grads)
    return {"params": params,
            "optimizer": {p.name: {"shape": list(p.shape), "dtype": str(p.dtype)} for p in states},
            "accu_grads": {p.name: {"shape": list(p.shape), "dtype": str(p.dtype)} for p in accu}}


ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
print("MINDFORMERS " + json.dumps([allocated(path) for path in sys.argv[1:]]))
'''
DTYPE = {"Float32": "float32", "BFloat16": "bfloat16", "Float16": "float16"}
ITEMSIZE = {"Float32": 4, "BFloat16": 2, "Float16": 2}

MANIFEST = """
[model]
init = "random"
hidden_size = 64
num_layers = {layers}
num_heads = 8
n_kv_heads = {kv}
intermediate_size = 128
vocab_size = 512
param_dtype = "bfloat16"
compute_dtype = "bfloat16"
[tokenizer]
kind = "trained"
vocab_size = 300
[dataset]
seq_length = 32
[hardware]
device = "ascend"
devices_per_node = 8
device_memory_gb = 32
[[hardware.nodes]]
host = "node0"
ip = "10.0.0.1"
device_ips = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8"]
[parallel]
data_parallel = {dp}
model_parallel = {mp}
pipeline_stage = {pp}
micro_batch_num = 4
vocab_emb_dp = {emb}
{offset}
[train]
batch_size = 2
method = "{method}"
[train.lora]
rank = 8
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[export]
model_parallel = 2
seq_length = 64
"""


def _manifest(path: Path, layers=8, kv=8, dp=1, mp=4, pp=2, emb=True, offset="", method="full") -> Path:
    path.write_text(MANIFEST.format(layers=layers, kv=kv, dp=dp, mp=mp, pp=pp, emb=str(emb).lower(), offset=offset,
                                    method=method))
    return path


def _yaml(m, path: Path) -> Path:
    """The run YAML as the run_config task writes it for this manifest."""
    par = m.parallel
    run = RunYaml(run_settings(m, BuildDir(m.build_dir), m.train.lora_config), micro_batch_num=par.micro_batch_num,
                  vocab_emb_dp=par.vocab_emb_dp, use_seq_parallel=par.use_seq_parallel, recompute=par.recompute,
                  gradient_aggregation_group=par.gradient_aggregation_group, offset=par.stage_offset,
                  device_memory_gb=m.hardware.device_memory_gb)
    return write_yaml(path, run)


PLANS = [dict(layers=9, kv=4, dp=1, mp=4, pp=2, emb=False, offset="offset = [0, 1]"),
         dict(layers=8, kv=8, dp=2, mp=2, pp=2, emb=True),
         dict(layers=4, kv=8, dp=1, mp=8, pp=1, emb=True),
         # LoRA on every target: only the adapters have gradients and moments; the frozen weights stay whole
         dict(layers=8, kv=4, dp=2, mp=2, pp=2, emb=True, method="lora")]


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """(manifest, what MindFormers allocates) for each of PLANS, from one process (importing it takes seconds)."""
    manifests, yamls = [], []
    for i, plan in enumerate(PLANS):
        root = tmp_path_factory.mktemp(f"plan{i}")
        manifests.append(load_manifest(_manifest(root / "qwen.toml", **plan)))
        yamls.append(str(_yaml(manifests[-1], root / "run_qwen1_5.yaml")))
    proc = subprocess.run([sys.executable, "-c", MINDFORMERS, *yamls], cwd=tmp_path_factory.mktemp("mindformers"),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MINDFORMERS ")]
    assert lines, proc.stderr[-3000:]
    return list(zip(manifests, json.loads(lines[0][len("MINDFORMERS "):])))


def _slice_bytes(entry: dict, split: list[int]) -> int:
    n = ITEMSIZE[entry["dtype"]]
    for size, parts in zip(entry["shape"], split):
        assert size % parts == 0
        n *= size // parts
    return n


def _optimizer_split(entry: dict, split: list[int], dp: int) -> int:
    """MindSpore's parallel optimizer (enabled by the Ascend YAML; applied when compiled, which CPU cannot do): a
    slice of at least parallel_optimizer_threshold (64 KB) whose first dimension divides is split over dp."""
    rows = entry["shape"][0] // split[0]
    return dp if _slice_bytes(entry, split) >= 64 * 1024 and rows % dp == 0 else 1


@pytest.mark.parametrize("index", range(len(PLANS)))
def test_parameter_gradient_and_optimizer_bytes_are_what_mindformers_allocates(allocated, index):
    m, theirs = allocated[index]
    dp = m.parallel.data_parallel
    ours = memory_estimate(m)
    assert len(ours) == m.parallel.pipeline_stage
    for stage, row in enumerate(ours):
        held = {name: p for name, p in theirs["params"].items() if p["stage"] == stage}
        assert held, stage
        # what the optimizer updates (every weight, or LoRA's adapters): only that has moments and gradients, and
        # only that the parallel optimizer splits
        trained = {name: p for name, p in held.items() if f"adam_m.{name}" in theirs["optimizer"]}
        assert trained, stage
        weights = sum(_slice_bytes(p, p["split"]) / (_optimizer_split(p, p["split"], dp) if n in trained else 1)
                      for n, p in held.items())
        moments = sum(_slice_bytes(theirs["optimizer"][f"{kind}.{name}"], p["split"])
                      / _optimizer_split(p, p["split"], dp) for name, p in trained.items()
                      for kind in ("adam_m", "adam_v"))
        assert row.component("weights").bytes == weights, stage
        assert row.component("optimizer").bytes == moments, stage
        if dp > 1 and m.train.lora_config is None:  # the embedding table is over the threshold: the plan splits it
            assert "split over data_parallel 2" in row.component("weights").what
        assert row.params == sum(_slice_bytes(p, p["split"]) // ITEMSIZE[p["dtype"]] for p in held.values())
        assert {DTYPE[p["dtype"]] for p in held.values()} == {row.component("weights").dtype} == {"float32"}
        assert {DTYPE[theirs["optimizer"][f"adam_m.{n}"]["dtype"]] for n in trained} == {"float32"}
        if m.parallel.pipeline_stage > 1:
            assert {n[len("accu_grads."):] for n in theirs["accu_grads"]} == set(
                n for n, p in theirs["params"].items() if f"adam_m.{n}" in theirs["optimizer"])
            grads = sum(_slice_bytes(theirs["accu_grads"][f"accu_grads.{name}"], p["split"])
                        for name, p in trained.items())
            assert row.component("gradients").bytes == grads, stage
            assert row.component("gradients").dtype == DTYPE[theirs["accu_grads"][f"accu_grads.{next(iter(trained))}"]
                                                             ["dtype"]]
        else:
            assert row.component("gradients").bytes == sum(_slice_bytes(p, p["split"]) for p in trained.values())
    # every parameter and optimizer state MindFormers made was counted, none twice
    assert sum(r.params for r in ours) == sum(
        _slice_bytes(p, p["split"]) // 4 for p in theirs["params"].values())
    lora = m.train.lora_config
    trainable = [n for n in theirs["params"] if "mindpet_delta_lora" in n] if lora else list(theirs["params"])
    assert len(theirs["optimizer"]) == 2 * len(trainable)
    if lora:
        assert len(trainable) == 2 * len(lora.targets) * m.model.num_layers


def test_the_seed_plan_counts_float32_master_weights_and_warns_on_the_last_stage():
    rows = mem.training_memory(QWEN72B, SEED, stage_layers(80, 4), 58 * GIB)
    per_layer = (4 * 8192 * 8192 + 3 * 8192 + 3 * 8192 * 24576) // 8 + 2 * 8192
    first = 20 * per_layer + 152064 * 8192
    assert [r.params for r in rows] == [first, 20 * per_layer, 20 * per_layer, first + 8192]
    for row in rows:
        assert row.component("weights").bytes == row.component("gradients").bytes == 4 * row.params
        assert row.component("optimizer").bytes == 8 * row.params
        assert row.component("weights").dtype == "float32" and row.component("activations").dtype == "bfloat16"
    tokens, h = 2048 * 2, 8192
    layer = 2 * (4 * tokens * h / 8 + tokens * (2 * h + 2 * h + 3 * 24576) / 8)
    # recompute keeps each layer's input (split by sequence parallelism), 4 micro batches in flight on stage 0
    assert rows[0].component("activations").bytes == pytest.approx(2 * tokens * h / 8 * 20 * 4 + layer)
    logits = tokens * 152064 * (2 + 4 + 4)
    assert rows[3].component("activations").bytes == pytest.approx(
        2 * tokens * h / 8 * 20 + layer + 2 * 2 * tokens * h / 8 + logits)
    assert [round(r.total / GIB, 2) for r in rows] == [51.83, 33.11, 32.95, 57.17]
    assert rows[0].headroom > mem.HEADROOM > rows[3].headroom > 0


def test_without_sequence_parallel_or_recompute_the_activations_grow():
    import dataclasses

    no_sp = mem.training_memory(QWEN72B, dataclasses.replace(SEED, use_seq_parallel=False), stage_layers(80, 4), 1)
    seed = mem.training_memory(QWEN72B, SEED, stage_layers(80, 4), 1)
    tokens, h = 4096, 8192
    assert no_sp[0].component("activations").bytes - seed[0].component("activations").bytes == pytest.approx(
        2 * tokens * h * (1 - 1 / 8) * 20 * 4 + 2 * 4 * tokens * h * (1 - 1 / 8))
    full = mem.training_memory(QWEN72B, dataclasses.replace(SEED, recompute=False), stage_layers(80, 4), 1)
    layer = 2 * (4 * tokens * h / 8 + tokens * (2 * h + 2 * h + 3 * 24576) / 8)
    assert full[1].component("activations").bytes == pytest.approx(layer * 20 * 3)
    # without recompute the float32 weights' bfloat16 casts stay for the backward pass
    assert full[1].component("weight_casts").bytes == 2 * full[1].params


def test_the_parallel_optimizer_splits_large_weights_and_moments_over_data_parallel():
    import dataclasses

    plan = dataclasses.replace(SEED, data_parallel=2, pipeline_stage=2)
    split, whole = (mem.training_memory(QWEN72B, dataclasses.replace(plan, parallel_optimizer=on),
                                        stage_layers(80, 2), 1)[0] for on in (True, False))
    # norms (32 KiB) and q/k/v biases (4 KiB a slice): under the 64 KB threshold, they stay whole
    small = 40 * (2 * 8192 + 3 * 8192 // 8) * 4
    assert split.component("weights").bytes == (whole.component("weights").bytes - small) / 2 + small
    assert split.component("optimizer").bytes == (whole.component("optimizer").bytes - 2 * small) / 2 + 2 * small
    assert split.component("gradients").bytes == whole.component("gradients").bytes


def test_max_device_memory_follows_the_card():
    assert [mem.max_device_memory_gb(gb) for gb in (64, 32, 96, 1)] == [58, 29, 87, 1]
    run = RunYaml(run_settings(load_manifest(REPO / "qwen.toml"), BuildDir(REPO / "build")), micro_batch_num=1,
                  vocab_emb_dp=True, use_seq_parallel=False, recompute=True, gradient_aggregation_group=4,
                  device_memory_gb=32)
    assert mindformers_config(run, "ascend")["context"]["max_device_memory"] == "29GB"
    assert "max_device_memory" not in mindformers_config(run, "cpu")["context"]


def test_export_card_memory_and_validate_refusing_a_topology_that_does_not_fit(tmp_path):
    card = mem.deployment_memory(QWEN72B, 4, True, 8192, 1, "bfloat16", True, 58 * GIB)
    layers = 80 * ((4 * 8192 * 8192 + 3 * 8192 + 3 * 8192 * 24576) // 4 + 2 * 8192)
    assert card.params == layers + 2 * 152064 * 8192 + 8192  # embedding and lm_head whole on every card
    assert card.component("weights").bytes == 2 * card.params
    assert card.component("kv_cache").bytes == 2 * 80 * 1 * 8192 * 16 * 128 * 2
    assert card.total < card.limit
    split = mem.deployment_memory(QWEN72B, 4, False, 8192, 1, "bfloat16", True, 58 * GIB)
    assert card.params - split.params == 2 * 152064 * 8192 * 3 // 4
    f32 = mem.deployment_memory(QWEN72B, 4, True, 8192, 1, "float32", True, 58 * GIB)
    assert f32.component("weights").bytes / GIB == pytest.approx(74.3, abs=0.1)  # issue's "about 74 GiB"
    # the seed's manifest: validate refuses export.model_parallel 2, naming the key and the mp that fits
    from qwenbuild.cli import main

    assert main(["init", "--preset", "qwen1.5-72b", "-o", str(tmp_path / "qwen.toml")]) == 0
    text = (tmp_path / "qwen.toml").read_text()
    (tmp_path / "qwen.toml").write_text(text.replace("model_parallel = 4  #", "model_parallel = 2  #"))
    with pytest.raises(ManifestError) as refused:
        load_manifest(tmp_path / "qwen.toml")
    [problem] = refused.value.problems
    assert problem.key == "export.model_parallel" and problem.line == text[:text.index("model_parallel = 4  #")].count(
        "\n") + 1
    assert "needs 81.0 GiB in bfloat16" in problem.message and "set export.model_parallel = 4" in problem.message
    (tmp_path / "qwen.toml").write_text(text)
    m = load_manifest(tmp_path / "qwen.toml")
    assert export_memory(m).component("weights").dtype == "bfloat16"
    assert [w.split(":")[0] for w in memory_warnings(m)] == ["stage 3"]


def test_a_cpu_worker_holds_every_stage_it_runs(tmp_path):
    from qwenbuild.plan import training_plan

    text = (REPO / "qwen.toml").read_text()
    path = tmp_path / "qwen.toml"
    path.write_text(text.replace("data_parallel = 2", "data_parallel = 1").replace(
        "pipeline_stage = 1", "pipeline_stage = 2").replace("micro_batch_num = 1", "micro_batch_num = 2"))
    m = load_manifest(path)
    [row] = memory_estimate(m)
    stages = mem.training_memory(m.model.config, training_plan(m), stage_layers(m.model.num_layers, 2), 1)
    assert row.label == "stages 0-1" and len(stages) == 2
    assert row.params == sum(s.params for s in stages) and row.total == pytest.approx(sum(s.total for s in stages))
    assert row.component("weights").dtype == m.model.param_dtype == "float32"
