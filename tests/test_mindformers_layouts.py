"""The synthesised strategy files against the layouts MindFormers itself declares: its LlamaForCausalLM built under a
semi-auto-parallel context for the seed's dp1 x mp8 x pp4 (nothing compiled), each primitive's shard() strategy and
each layer's pipeline stage read back and compared with ours, for both vocab_emb_dp values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenbuild.model.config import QwenConfig
from qwenbuild.parallel import strategy as st

pytestmark = pytest.mark.slow
CFG = QwenConfig(vocab_size=256, hidden_size=64, num_layers=8, num_heads=8, n_kv_heads=8, intermediate_size=128)
# MindFormers' primitive attribute -> the op name in our strategy files
PRIMITIVES = {"matmul": "MatMul", "bias_add": "BiasAdd", "gather": "Gather"}

MINDFORMERS = '''
import json, sys
import mindspore as ms
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
from mindformers.modules.transformer import TransformerOpParallelConfig
from mindformers.modules.transformer import op_parallel_config
dp, mp, pp, vocab_emb_dp = 1, 8, 4, sys.argv[1] == "true"
# its config check asks the communication group, which is 1 without msrun
op_parallel_config.D.get_group_size = lambda *a, **k: dp * mp * pp
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=dp * mp * pp, pipeline_stages=pp,
                             full_batch=True)
pc = TransformerOpParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, vocab_emb_dp=vocab_emb_dp,
                                 micro_batch_num=pp)
net = LlamaForCausalLM(LlamaConfig(batch_size=1, seq_length=16, hidden_size=64, num_layers=8, num_heads=8,
                                   n_kv_heads=8, vocab_size=256, intermediate_size=128, qkv_has_bias=True,
                                   use_flash_attention=False, use_rope_slice=True, parallel_config=pc,
                                   compute_dtype="float32", param_init_type="float32"))
ops = {}
for name, cell in net.cells_and_names():
    for attr in ("matmul", "bias_add", "gather"):
        prim = getattr(cell, attr, None)
        if prim is not None and "in_strategy" in getattr(prim, "attrs", {}):
            ops[f"{name}/{attr}"] = [list(s) for s in prim.attrs["in_strategy"]]
stages = {i: layer.pipeline_stage for i, layer in enumerate(net.model.layers)}
print("LAYOUTS " + json.dumps({"ops": ops, "stages": stages}))
'''


def _mindformers(vocab_emb_dp: bool, cwd) -> dict:
    proc = subprocess.run([sys.executable, "-c", MINDFORMERS, "true" if vocab_emb_dp else "false"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("LAYOUTS ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("LAYOUTS "):])


@pytest.mark.parametrize("vocab_emb_dp", [True, False])
def test_strategy_files_declare_mindformers_own_layouts(tmp_path, vocab_emb_dp):
    theirs = _mindformers(vocab_emb_dp, tmp_path)
    ours = {}
    for stage in range(4):
        doc = st.stage_strategy(CFG, 1, 8, 4, stage, vocab_emb_dp)
        for key, item in doc["parallel_strategy_item"].items():
            ours.setdefault(key, (item["parallel_strategy"], item["stage"]))
    compared = 0
    for key, strategy in theirs["ops"].items():
        cell, attr = key.rsplit("/", 1)
        mine = ours.get(f"{cell}/{PRIMITIVES[attr]}")
        if mine is None:
            continue  # a primitive without a parameter of its own (attention scores, ...)
        assert mine[0] == strategy, key
        compared += 1
    # every layer's q/k/v (weight and bias), wo, w1, w2, w3, plus the embedding and lm_head
    assert compared == 8 * 10 + 2
    for layer, stage in theirs["stages"].items():
        assert ours[f"model.layers.{layer}.attention.wq/MatMul"][1] == stage, layer
