"""The inference runtime over exported graphs: same tokens as the eager network and transformers, logits within
1e-5, batching, sampling, the CLI, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.export import export_mindir
from qwenbuild.export.graph_files import FULL, INC, sidecar_file
from qwenbuild.infer.backends import GraphCellBackend, open_backend
from qwenbuild.infer.prompt import chat_text
from qwenbuild.tokenizer import stop_ids
from qwenbuild.infer.runtime import generate, generate_ids, open_export, warm_up
from qwenbuild.infer.sampling import Sampling
from qwenbuild.model.config import QwenConfig

SEED_PROMPT = "帮助我制定一份去上海的旅游攻略"
SEQ = 96
CORPUS = [SEED_PROMPT, "You are a helpful assistant.", "Plan a trip to Shanghai for me.",
          "上海是一个美丽的城市，有很多好吃的。", "The weather is nice today, let us walk."] * 10


def _tiny_hf(directory, vocab_size, seed=0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    # a wide init keeps the top two logits far apart, so float rounding cannot flip an argmax
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qwenbuild.tokenizer import train_tokenizer
    from qwenbuild.weights import convert_weight

    root = tmp_path_factory.mktemp("tiny")
    hf = _tiny_hf(root / "hf", 320)
    convert_weight(hf, root / "tiny.ckpt", progress=None)
    train_tokenizer(CORPUS, 300, root / "tokenizer")
    cfg = QwenConfig.from_hf_dir(hf)
    export_mindir(cfg, root / "tiny.ckpt", root / "output", rank=0, batch_size=1, seq_length=SEQ, progress=None)
    return {"root": root, "hf": hf, "ckpt": root / "tiny.ckpt", "tok": root / "tokenizer", "cfg": cfg,
            "out": root / "output"}


@pytest.fixture(scope="module")
def eager(tiny):
    import mindspore as ms
    from qwenbuild.model.network import QwenForCausalLM, use_composed_kernels
    from qwenbuild.weights.mindspore_ckpt import load_weights

    ms.set_context(mode=ms.GRAPH_MODE)
    net = QwenForCausalLM(tiny["cfg"])
    use_composed_kernels(net)  # the kernels the exported graphs hold: the same arithmetic, compared to 1e-5
    load_weights(net, tiny["ckpt"])
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def runner(tiny):
    info = open_export(tiny["out"])
    backend = GraphCellBackend(info.graph_path(FULL), info.graph_path(INC))
    warm_up(backend, info)
    return info, backend


@pytest.fixture(scope="module")
def runner3(tiny, tmp_path_factory):
    """The same model exported with batch_size 3."""
    out = tmp_path_factory.mktemp("b3")
    export_mindir(tiny["cfg"], tiny["ckpt"], out, batch_size=3, seq_length=SEQ, progress=None)
    info = open_export(out, batch_size=3)
    return info, open_backend("graphcell", info.graph_path(FULL), info.graph_path(INC))


PROMPTS = [[5, 17, 42, 99, 3], [250, 1, 2], list(range(30, 70))]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_eager_network_and_transformers(tiny, eager, runner, prompt):
    import torch
    from transformers import Qwen2ForCausalLM
    from qwenbuild.model.network import greedy_generate

    info, backend = runner
    n = 6
    (exported,), _ = generate_ids(backend, info, [prompt], n, eos_ids=())
    assert exported == greedy_generate(eager, prompt, n)
    hf = Qwen2ForCausalLM.from_pretrained(tiny["hf"]).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    assert exported == out[0, len(prompt):].tolist()
    assert len(exported) == n


def test_prefill_logits_match_eager_within_1e_5(eager, runner):
    from mindspore import Tensor

    info, backend = runner
    prompt = PROMPTS[2]
    ids = np.zeros((1, SEQ), np.int32)
    ids[0, :len(prompt)] = prompt
    graph_logits = backend.prefill(ids, np.array([len(prompt)], np.int32), np.zeros((1,), np.int64),
                                   np.zeros((SEQ,), np.int64))
    eager_logits = eager(Tensor(np.array([prompt], np.int32))).asnumpy()[:, -1]
    assert graph_logits.shape == (1, 320)
    np.testing.assert_allclose(graph_logits, eager_logits, atol=1e-5, rtol=0)


def test_generation_stops_at_eos_and_at_seq_length(runner):
    info, backend = runner
    prompt = PROMPTS[0]
    (free,), _ = generate_ids(backend, info, [prompt], 8, eos_ids=())
    (stopped,), _ = generate_ids(backend, info, [prompt], 8, eos_ids=[free[3]])
    assert stopped == free[:free.index(free[3]) + 1]
    long_prompt = list(range(1, SEQ - 2))
    (tail,), _ = generate_ids(backend, info, [long_prompt], 50, eos_ids=())
    assert len(tail) == 3  # prompt + generated never exceed seq_length


def test_batch_rows_of_different_lengths_match_single_runs(runner, runner3):
    info1, backend1 = runner
    info3, backend3 = runner3
    singles = [generate_ids(backend1, info1, [p], 5, eos_ids=())[0][0] for p in PROMPTS]
    eos = [singles[1][1]]  # the second row stops early while the others go on
    batched, _ = generate_ids(backend3, info3, PROMPTS, 5, eos_ids=eos)
    expected = [s[:s.index(eos[0]) + 1] if eos[0] in s else s for s in singles]
    assert batched == expected
    two, _ = generate_ids(backend3, info3, PROMPTS[:2], 5, eos_ids=eos)
    assert two == expected[:2]


def _prefill_then_decode(backend, rows, batch_index, steps=2):
    """Logits of a prefill and `steps` decode calls (fixed next tokens), rows in batch order."""
    b = len(rows)
    ids = np.zeros((b, SEQ), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    valid = np.array([len(row) for row in rows], np.int32)
    index, window = np.array(batch_index, np.int64), np.zeros((SEQ,), np.int64)
    out = [backend.prefill(ids, valid, index, window)]
    for step in range(steps):
        valid = valid + 1
        out.append(backend.decode(np.full((b, 1), 7 + step, np.int32), valid, index, window))
    return np.stack(out)


def test_batch_index_picks_the_cache_rows(runner3):
    _, backend = runner3
    in_order = _prefill_then_decode(backend, PROMPTS, [0, 1, 2])
    permuted = _prefill_then_decode(backend, PROMPTS, [2, 0, 1])
    np.testing.assert_allclose(permuted, in_order, atol=1e-5, rtol=0)
    assert np.abs(in_order[:, 0] - in_order[:, 1]).max() > 1e-2  # the rows differ: a mix-up would show


def test_sampling_is_seeded_and_follows_the_filters(runner):
    info, backend = runner
    prompt = PROMPTS[0]
    draw = lambda seed, **kw: generate_ids(backend, info, [prompt], 10, (), Sampling(True, seed=seed, **kw))[0][0]
    assert draw(1) == draw(1)
    assert len({tuple(draw(s, top_k=0, top_p=1.0, temperature=5.0)) for s in range(4)}) > 1
    greedy = generate_ids(backend, info, [prompt], 10, ())[0][0]
    assert draw(7, top_k=1) == greedy


def test_sampling_filters_equal_transformers_processors():
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    from qwenbuild.infer.sampling import repetition_penalty, top_k_filter, top_p_filter

    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32) * 3
    seen = [3, 9, 9, 40]
    t = torch.tensor(logits)[None]
    ids = torch.tensor([seen])
    np.testing.assert_array_equal(repetition_penalty(logits, seen, 1.3),
                                  RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone())[0].numpy())
    np.testing.assert_array_equal(top_k_filter(logits, 5), TopKLogitsWarper(5)(ids, t.clone())[0].numpy())
    np.testing.assert_array_equal(top_p_filter(logits, 0.6), TopPLogitsWarper(0.6)(ids, t.clone())[0].numpy())


def test_chat_prompt_and_eos_ids_come_from_the_tokenizer(tiny):
    from qwenbuild.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["tok"])
    assert stop_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    ids = tok(chat_text("hi"), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                               "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwenbuild", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_seed_prompt_json(tiny):
    from qwenbuild.tokenizer import load_tokenizer

    proc = _cli("infer", "--mindir_root_dir", tiny["out"], "--tokenizer_dir", tiny["tok"],
                "--predict_data", SEED_PROMPT, "--max_new_tokens", 7, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    tok = load_tokenizer(tiny["tok"])
    assert doc["prompt_ids"] == tok(chat_text(SEED_PROMPT), add_special_tokens=False)["input_ids"]
    assert 1 <= len(doc["generated_ids"]) <= 7 and doc["tokens_per_s"] > 0
    assert doc["text"] == tok.decode(doc["generated_ids"], skip_special_tokens=True)
    raw = _cli("infer", "--mindir_root_dir", tiny["out"], "--tokenizer_dir", tiny["tok"],
               "--predict_data", SEED_PROMPT, "--max_new_tokens", 3, "--raw", "--json")
    assert json.loads(raw.stdout)["prompt_ids"] == tok(SEED_PROMPT, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "2"], "--batch_size 2 does not match the export"),
    (["--seq_length", "64"], "--seq_length 64 does not match the export"),
    (["--backend", "lite"], "mindspore_lite"),
    (["--ge_config_path", "nowhere.ini"], "nowhere.ini does not exist"),
    (["--predict_data", "x" * 300, "--raw"], "leaves room for at most 95 prompt tokens"),
])
def test_cli_errors_are_clear(tiny, extra, message):
    args = ["infer", "--mindir_root_dir", tiny["out"], "--tokenizer_dir", tiny["tok"], "--predict_data", "hi"]
    proc = _cli(*args, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_or_incomplete_export_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        open_export(tmp_path / "nothing")
    copy = tmp_path / "copy"
    shutil.copytree(tiny["out"], copy)
    (copy / "mindir_inc_checkpoint" / "rank_0_graph.mindir").chmod(0o600)
    (copy / "mindir_inc_checkpoint" / "rank_0_graph.mindir").unlink()
    with pytest.raises(UserError, match="inc graph .* does not exist"):
        open_export(copy)
    sidecar_file(copy, FULL, 0).unlink()
    with pytest.raises(UserError, match="rank_0_graph.json does not exist"):
        open_export(copy)
    with pytest.raises(UserError, match="does not exist"):
        open_export(tiny["out"], rank=3)


def test_prompt_errors(tiny, runner):
    info, backend = runner
    with pytest.raises(UserError, match="2 prompts do not fit the exported batch_size 1"):
        generate_ids(backend, info, [[1], [2]], 3, ())
    with pytest.raises(UserError, match="token id 320, outside"):
        generate_ids(backend, info, [[1, 320]], 3, ())
    with pytest.raises(UserError, match="--top_p"):
        Sampling(True, top_p=0.0)


@pytest.mark.slow
def test_seed_prompt_with_the_real_qwen_tokenizer(tmp_path):
    from qwenbuild.tokenizer import build_qwen_tokenizer, load_tokenizer
    from qwenbuild.weights import convert_weight

    build_qwen_tokenizer(tmp_path / "qwen_tok")
    hf = _tiny_hf(tmp_path / "hf", 151936, seed=1)
    convert_weight(hf, tmp_path / "q.ckpt", progress=None)
    export_mindir(QwenConfig.from_hf_dir(hf), tmp_path / "q.ckpt", tmp_path / "out", seq_length=64, progress=None)
    result = generate(tmp_path / "out", tmp_path / "qwen_tok", SEED_PROMPT, max_new_tokens=4)
    tok = load_tokenizer(tmp_path / "qwen_tok")
    assert result.prompt_ids[0][:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert tok.decode(result.prompt_ids[0]) == chat_text(SEED_PROMPT)
    assert stop_ids(tok) == [151645, 151643]
    assert 1 <= len(result.generated_ids[0]) <= 4
