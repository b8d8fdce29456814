"""The MindFormers YAML loads in mindformers 1.9 and the CPU variant builds a LlamaForCausalLM equal to our network."""

from __future__ import annotations

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.train.mindformers_yaml import RunYaml, mindformers_config, write_yaml
from train_data import TINY

RUN = RunYaml(seq_length=16, batch_size=2, learning_rate=3e-4, train_dataset="/data/train.mindrecord",
              load_checkpoint="/build/output/transformed_checkpoint/qwen", data_parallel=1, model_parallel=4,
              pipeline_stage=2, micro_batch_num=8, epochs=3, warmup_ratio=0.05, weight_decay=0.02)


def test_ascend_yaml_loads_in_mindformers_with_the_performance_settings(tmp_path):
    from mindformers.tools.register import MindFormerConfig

    config = MindFormerConfig(str(write_yaml(tmp_path / "run_qwen1_5.yaml", TINY, RUN, "ascend")))
    model = config.model.model_config
    assert (model.use_flash_attention, model.fused_rms_norm, model.use_rope_slice) == (True, True, False)
    assert model.compute_dtype == "bfloat16" and model.qkv_has_bias is True and model.n_kv_heads == 2
    assert (model.hidden_size, model.num_layers, model.vocab_size, model.seq_length) == (32, 2, 48, 16)
    assert config.recompute_config.recompute is True and config.parallel_config.use_seq_parallel is True
    assert (config.parallel_config.model_parallel, config.parallel_config.pipeline_stage) == (4, 2)
    assert config.parallel.parallel_mode == 1 and config.context.device_target == "Ascend"
    assert config.load_checkpoint == RUN.load_checkpoint and config.auto_trans_ckpt is False
    assert config.train_dataset.data_loader.dataset_dir == "/data/train.mindrecord"
    assert config.optimizer.betas == [0.9, 0.95] and config.optimizer.eps == 1e-8
    assert config.lr_schedule.type == "CosineWithWarmUpLR" and config.lr_schedule.warmup_ratio == 0.05
    assert config.runner_config.epochs == 3 and config.runner_config.batch_size == 2


def test_cpu_yaml_refuses_model_parallel():
    with pytest.raises(UserError, match="model_parallel=4, pipeline_stage=2 cannot run on CPU"):
        mindformers_config(TINY, RUN, "cpu")


@pytest.mark.slow
def test_cpu_yaml_builds_llama_that_matches_our_network(tmp_path):
    import dataclasses

    import mindspore as ms

    from qwenbuild.model.network import QwenForCausalLM
    from qwenbuild.train.mindformers_yaml import llama_from_yaml

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cpu = dataclasses.replace(RUN, model_parallel=1, pipeline_stage=1, data_parallel=2, micro_batch_num=1)
    path = write_yaml(tmp_path / "run_cpu.yaml", TINY, cpu, "cpu")
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
