"""Deployment the seed's way: graphs with MindFormers' signature and the KV cache inside, exported per
tensor-parallel rank (mp 1, 2, 4) and run across the ranks under msrun: the same greedy tokens as transformers."""

from __future__ import annotations

import json

import pytest

from hf_tiny import tiny_hf_model

pytestmark = pytest.mark.slow

SEQ = 48
CORPUS = ["帮助我制定一份去上海的旅游攻略", "You are a helpful assistant.", "Plan a trip to Shanghai for me.",
          "上海是一个美丽的城市，有很多好吃的。", "The weather is nice today, let us walk."] * 10
PROMPTS = ["Plan a trip to Shanghai", "上海是一个美丽的城市"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    import torch

    from qwenbuild.export import export_mindir
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.parallel import reshard
    from qwenbuild.parallel.strategy import write_strategy_files
    from qwenbuild.tokenizer import load_tokenizer, stop_ids, train_tokenizer
    from qwenbuild.infer.prompt import encode
    from qwenbuild.weights import convert_weight

    root = tmp_path_factory.mktemp("deploy")
    hf = tiny_hf_model(root / "hf", heads=4, n_kv_heads=4, hidden=64, intermediate=128, vocab=320, seed=5)
    with torch.no_grad():  # a wide init keeps the top two logits apart, so rounding cannot flip an argmax
        for p in hf.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    hf.save_pretrained(root / "hf")
    convert_weight(root / "hf", root / "full.ckpt", progress=None)
    train_tokenizer(CORPUS, 300, root / "tok")
    cfg = QwenConfig.from_hf_dir(root / "hf")
    tokenizer = load_tokenizer(root / "tok")
    expected = []
    for prompt in PROMPTS:
        ids = encode(tokenizer, prompt, raw=True)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=stop_ids(tokenizer),
                          pad_token_id=0)[0, len(ids):].tolist()
        expected.append(out)
    for mp in (1, 2, 4):
        out = root / f"mp{mp}"
        if mp == 1:
            export_mindir(cfg, root / "full.ckpt", out, batch_size=2, seq_length=SEQ, tokenizer_dir=root / "tok",
                          progress=None)
            continue
        write_strategy_files(cfg, 1, mp, 1, root / f"strategy{mp}", vocab_emb_dp=False)
        reshard.transform_ckpt("", root / f"strategy{mp}", root / "full.ckpt", root / f"shards{mp}", progress=None)
        export_mindir(cfg, root / f"shards{mp}", out, batch_size=2, seq_length=SEQ, tokenizer_dir=root / "tok",
                      model_parallel=mp, strategy_dir=root / f"strategy{mp}", progress=None)
    return root, cfg, expected


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_greedy_tokens_across_ranks_equal_transformers(deployed, mp):
    from qwenbuild.infer.runtime import generate_on_ranks

    root, cfg, expected = deployed
    out = root / f"mp{mp}"
    doc = json.loads((out / "mindir_inc_checkpoint" / f"rank_{mp - 1}_graph.json").read_text())
    assert doc["model_parallel"] == mp and doc["rank"] == mp - 1
    assert doc["kv_cache"]["shape"] == [2 * cfg.n_kv_heads // mp * SEQ, cfg.head_dim]
    assert sorted(p.name for p in (out / "mindir_full_checkpoint").glob("*.mindir")) == \
        [f"rank_{r}_graph.mindir" for r in range(mp)]
    both = generate_on_ranks(out, root / "tok", PROMPTS, max_new_tokens=10, raw=True)
    assert both.generated_ids == expected
    one = generate_on_ranks(out, root / "tok", PROMPTS[1:], max_new_tokens=10, raw=True)
    assert one.generated_ids == expected[1:]
    assert all(len(g) >= 2 for g in expected)
