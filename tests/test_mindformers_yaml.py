"""The MindFormers YAML loads in mindformers 1.9 and the CPU variant builds a LlamaForCausalLM equal to our network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.train.mindformers_yaml import RunYaml, mindformers_config, write_yaml
from qwenbuild.train.settings import TrainSettings
from train_data import TINY

SETTINGS = TrainSettings(model=dataclasses.replace(TINY, compute_dtype="bfloat16"), train_data="/data/train.mindrecord", output_dir="/build/output", seq_length=16,
                         batch_size=2, learning_rate=3e-4, init_checkpoint="/build/transformed_checkpoint/qwen",
                         workers=1, model_parallel=4, pipeline_stage=2, epochs=3, warmup_ratio=0.05,
                         weight_decay=0.02, beta1=0.8, beta2=0.99, eps=1e-6, lr_end=1e-5, keep_checkpoint_max=3,
                         save_steps=50, seed=11, device_target="Ascend")
PLAN = dict(micro_batch_num=8, vocab_emb_dp=False, use_seq_parallel=True, recompute=True, gradient_aggregation_group=4)
RUN = RunYaml(SETTINGS, **PLAN)


def test_ascend_yaml_loads_in_mindformers_with_the_performance_settings(tmp_path):
    from mindformers.tools.register import MindFormerConfig

    config = MindFormerConfig(str(write_yaml(tmp_path / "run_qwen1_5.yaml", RUN)))
    model = config.model.model_config
    assert (model.use_flash_attention, model.fused_rms_norm, model.use_rope_slice) == (True, True, False)
    assert model.compute_dtype == "bfloat16" and model.qkv_has_bias is True and model.n_kv_heads == 2
    assert (model.hidden_size, model.num_layers, model.vocab_size, model.seq_length) == (32, 2, 48, 16)
    assert config.recompute_config.recompute is True and config.parallel_config.use_seq_parallel is True
    assert (config.parallel_config.model_parallel, config.parallel_config.pipeline_stage) == (4, 2)
    assert config.parallel.parallel_mode == 1 and config.context.device_target == "Ascend"
    assert config.load_checkpoint == SETTINGS.init_checkpoint and config.auto_trans_ckpt is False
    assert config.train_dataset.data_loader.dataset_dir == "/data/train.mindrecord"
    assert config.runner_config.epochs == 3 and config.runner_config.batch_size == 2
    assert config.runner_config.stop_step == 0 and config.parallel_config.micro_batch_num == 8


def test_every_training_value_is_the_one_run_json_holds():
    config = mindformers_config(RUN)
    assert config["optimizer"] == {"type": "AdamW", "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.02}
    assert config["lr_schedule"] == {"type": "CosineWithWarmUpLR", "learning_rate": 3e-4, "lr_end": 1e-5,
                                     "warmup_ratio": 0.05, "total_steps": -1}
    assert (config["seed"], config["output_dir"]) == (11, "/build/output")
    monitor = config["callbacks"][1]
    assert (monitor["prefix"], monitor["save_checkpoint_steps"], monitor["keep_checkpoint_max"]) == ("qwen2", 50, 3)
    fixed = mindformers_config(RunYaml(dataclasses.replace(SETTINGS, steps=600), **PLAN))
    assert fixed["runner_config"]["stop_step"] == 600 and fixed["lr_schedule"]["total_steps"] == 600


def test_the_predict_yaml_holds_the_deployment_dtype(tmp_path):
    """predict_config: param_init_type is export.dtype on Ascend, compute_dtype too when 16-bit (use_past's rotary
    kernel takes 16-bit inputs only); the CPU YAML is float32 throughout; the default dtype follows the device."""
    from qwenbuild.manifest import load_manifest
    from qwenbuild.manifest._template import render
    from qwenbuild.train.mindformers_yaml import predict_config

    for dtype, compute in (("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16")):
        model = predict_config(RUN, 2, "/build/weights/qwen.ckpt", 64, 16, "ascend", dtype=dtype)["model"]
        assert (model["model_config"]["param_init_type"], model["model_config"]["compute_dtype"]) == (dtype, compute)
    cpu = dataclasses.replace(RUN, settings=dataclasses.replace(SETTINGS, model_parallel=1, pipeline_stage=1,
                                                                device_target="CPU"))
    model = predict_config(cpu, 1, "/build/weights/qwen.ckpt", 64, 16, "cpu", dtype="bfloat16")["model"]
    assert (model["model_config"]["param_init_type"], model["model_config"]["compute_dtype"]) == ("float32",) * 2
    (tmp_path / "qwen.toml").write_text(render("qwen1.5-72b"))
    seed = load_manifest(tmp_path / "qwen.toml")
    assert (seed.hardware.device, seed.model.param_dtype, seed.export.dtype) == ("ascend", "bfloat16", None)
    assert seed.export.dtype_on(seed.hardware.device, seed.model.param_dtype) == "bfloat16"
    assert seed.export.dtype_on("cpu", seed.model.param_dtype) == "float32"


def test_cpu_yaml_refuses_model_parallel():
    with pytest.raises(UserError, match="model_parallel=4, pipeline_stage=2 cannot run on CPU"):
        mindformers_config(RUN, "cpu")


@pytest.mark.slow
def test_cpu_yaml_builds_llama_that_matches_our_network(tmp_path):
    import mindspore as ms

    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.train.mindformers_yaml import llama_from_yaml

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cpu = RunYaml(dataclasses.replace(SETTINGS, model_parallel=1, pipeline_stage=1, workers=2, device_target="CPU"),
                  **dict(PLAN, micro_batch_num=1, use_seq_parallel=False, recompute=False))
    path = write_yaml(tmp_path / "run_cpu.yaml", cpu)
    ms.set_seed(3)
    ours = QwenForCausalLM(TINY)
    ms.save_checkpoint(ours, str(tmp_path / "w.ckpt"))
    llama = llama_from_yaml(path)
    not_loaded, _ = ms.load_param_into_net(llama, ms.load_checkpoint(str(tmp_path / "w.ckpt")))
    assert not_loaded == []
    llama.set_train(False)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    theirs = llama(ms.Tensor(ids))[0].asnumpy()
    np.testing.assert_allclose(theirs, ours(ms.Tensor(ids)).asnumpy(), atol=1e-5)
