"""What a training process holds, read from the strategy files; layouts the network cannot run are refused."""

from __future__ import annotations

import json

import pytest

from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.network import QwenForCausalLM
from qwenbuild.model.tensor_parallel import ModelParallel
from qwenbuild.parallel.rank_layout import process_layout
from qwenbuild.parallel.strategy import write_strategy_files

CFG = QwenConfig(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, n_kv_heads=2, intermediate_size=64)


def test_dp2_mp2_pp2_process_stands_for_one_rank_per_stage(tmp_path):
    strategy = tmp_path / "strategy"  # the working directory is tmp_path: an output never replaces it
    write_strategy_files(CFG, 2, 2, 2, strategy, vocab_emb_dp=False)
    layout = process_layout(strategy, 3, 4, 2)
    assert (layout.ranks, layout.model_parallel, layout.mp_index, layout.data_parallel) == ((3, 7), 2, 1, 2)
    assert (layout.mp_group, layout.dp_group, layout.dp_index) == ((2, 3), (1, 3), 1)
    assert layout.split("model.layers.0.attention.wq.weight") == 0
    assert layout.split("model.layers.3.attention.wq.bias") == 0
    assert layout.split("model.layers.3.feed_forward.w2.weight") == 1
    assert layout.split("model.layers.0.attention_norm.weight") is None
    assert layout.split("lm_head.weight") == 0
    assert layout.shard_shape("model.layers.0.attention.wk.weight", (16, 32)) == (8, 32)
    # layers 0-1 and the embedding on stage 0, layers 2-3, norm_out and lm_head on stage 1
    keep = layout.stage_filter(1)
    assert keep("lm_head.weight") and keep("adam_m.model.layers.2.attention.wq.weight") and keep("global_step")
    assert not keep("model.tok_embeddings.embedding_weight") and not keep("adam_v.model.layers.1.attention.wq.weight")


def test_a_plan_the_files_were_not_written_for_is_refused(tmp_path):
    strategy = tmp_path / "strategy"  # the working directory is tmp_path: an output never replaces it
    write_strategy_files(CFG, 1, 2, 1, strategy)
    with pytest.raises(UserError, match=r"holds 2 ranks per stage, the run has 4 processes"):
        process_layout(strategy, 0, 4, 1)
    with pytest.raises(UserError, match="no strategy file for rank 2"):
        process_layout(strategy, 0, 2, 2)


def test_a_layout_the_network_cannot_run_is_named(tmp_path):
    strategy = tmp_path / "strategy"  # the working directory is tmp_path: an output never replaces it
    write_strategy_files(CFG, 1, 2, 1, strategy, vocab_emb_dp=True)
    for path in strategy.glob("ckpt_strategy_rank_*.json"):
        data = json.loads(path.read_text())
        data["parallel_layout_item"]["model.layers.1.attention.wo.weight"]["tensor_map"] = [-1, -1]
        path.write_text(json.dumps(data))
    layout = process_layout(strategy, 0, 2, 1)
    with pytest.raises(UserError, match="splits model.layers.1.attention.wo.weight and "
                                        "model.layers.1.attention.wq.weight inconsistently"):
        QwenForCausalLM(CFG, ModelParallel(layout))
