"""The MindSpore Qwen1.5 network: logits against transformers and mindformers, KV-cache graphs, MINDIR, loading."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn

from hf_tiny import tiny_hf_model
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.network import DecodeCell, PrefillCell, QwenForCausalLM, cache_shape, greedy_generate
from qwenbuild.model.params import CONFIG_ENTRY, parameter_shapes
from qwenbuild.weights import convert_weight
from qwenbuild.weights.mindspore_ckpt import load_weights

VOCAB = 96


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _converted(tmp_path, dtype=None, **model_kwargs):
    hf = tiny_hf_model(tmp_path / "hf", **model_kwargs)
    convert_weight(tmp_path / "hf", tmp_path / "model.ckpt", dtype, progress=None)
    return hf, QwenConfig.from_hf_dir(tmp_path / "hf"), tmp_path / "model.ckpt"


def _ids(batch, seq, seed=1):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq)).astype(np.int32)


def _mindformers_net(cfg: QwenConfig, seq_length):
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM

    mf_cfg = LlamaConfig(
        batch_size=2, seq_length=seq_length, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, n_kv_heads=cfg.n_kv_heads, intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, theta=cfg.rope_theta,
        max_position_embedding=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        qkv_has_bias=True, use_rope_slice=True, use_flash_attention=False, fused_rms_norm=False, use_past=False,
        compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
        rotary_dtype="float32", param_init_type="float32")
    net = LlamaForCausalLM(mf_cfg)
    net.set_train(False)
    return net


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_names_are_mindformers_names(tied):
    cfg = QwenConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                     intermediate_size=64, tie_word_embeddings=tied)
    ours = [(p.name, tuple(p.shape)) for p in QwenForCausalLM(cfg).get_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in _mindformers_net(cfg, 8).parameters_and_names()]
    assert ours == list(parameter_shapes(cfg).items()) == theirs
    assert ("lm_head.weight" in dict(ours)) is not tied


@pytest.mark.parametrize("n_kv_heads,tied", [(2, False), (4, False), (2, True), (4, True)])
def test_logits_match_transformers_and_mindformers(tmp_path, n_kv_heads, tied):
    hf, cfg, ckpt = _converted(tmp_path, n_kv_heads=n_kv_heads, tied=tied)
    ids = _ids(2, 12)
    net = QwenForCausalLM(cfg)
    load_weights(net, ckpt)
    ours = net(Tensor(ids)).asnumpy()
    expected = _hf_logits(hf, ids)
    assert ours.shape == (2, 12, VOCAB) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)

    mf = _mindformers_net(cfg, 12)
    # the stored config.json is a string entry beside the weights, which strict loading would list as unexpected
    weights = {n: p for n, p in ms.load_checkpoint(str(ckpt)).items() if n != CONFIG_ENTRY}
    not_loaded, unexpected = ms.load_param_into_net(mf, weights, strict_load=True)
    assert not_loaded == [] and unexpected == []
    theirs = mf(Tensor(ids))[0].asnumpy().reshape(expected.shape)
    np.testing.assert_allclose(theirs, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_parameters_compute_in_float32(tmp_path, dtype):
    hf, cfg, ckpt = _converted(tmp_path, dtype=dtype)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch_dtype).float())
    rounded = hf
    net = QwenForCausalLM(QwenConfig(**{**cfg.__dict__, "param_dtype": "bfloat16" if dtype == "bf16" else "float16"}))
    load_weights(net, ckpt)
    assert {p.dtype for p in net.get_parameters()} == {ms.bfloat16 if dtype == "bf16" else ms.float16}
    ids = _ids(1, 9)
    logits = net(Tensor(ids)).asnumpy()
    np.testing.assert_allclose(logits, _hf_logits(rounded, ids), atol=1e-5, rtol=0)
    # a float32 checkpoint is cast on load to the network's parameter dtype, giving the same values
    convert_weight(tmp_path / "hf", tmp_path / "fp32.ckpt", progress=None)
    load_weights(net, tmp_path / "fp32.ckpt")
    np.testing.assert_array_equal(net(Tensor(ids)).asnumpy(), logits)


def test_prefill_decode_chain_equals_full_forward_and_runs_as_mindir(tmp_path):
    _, cfg, ckpt = _converted(tmp_path, n_kv_heads=2)
    seq = 12
    net = QwenForCausalLM(cfg)
    load_weights(net, ckpt)
    tokens = _ids(2, seq)
    full = net(Tensor(tokens)).asnumpy()
    prompt_lengths = np.array([5, 3], np.int32)
    prompts = tokens.copy()
    for row, n in enumerate(prompt_lengths):
        prompts[row, n:] = 0  # right padding must not leak into the valid positions

    prefill, decode = PrefillCell(net, seq), DecodeCell(net, seq)
    assert [p.name for p in prefill.get_parameters()] == list(parameter_shapes(cfg))
    shape = cache_shape(cfg, 2, seq)
    ms.export(prefill, Tensor(np.zeros((2, seq), np.int32)), Tensor(np.ones(2, np.int32)),
              file_name=str(tmp_path / "prefill"), file_format="MINDIR")
    ms.export(decode, Tensor(np.zeros((2, 1), np.int32)), Tensor(np.ones(2, np.int32)),
              Tensor(np.zeros(shape, np.float32)), Tensor(np.zeros(shape, np.float32)),
              file_name=str(tmp_path / "decode"), file_format="MINDIR")
    graphs = (nn.GraphCell(ms.load(str(tmp_path / "prefill.mindir"))),
              nn.GraphCell(ms.load(str(tmp_path / "decode.mindir"))))

    rows = np.arange(2)
    for run_prefill, run_decode in ((prefill, decode), graphs):
        valid = prompt_lengths.copy()
        logits, keys, values = run_prefill(Tensor(prompts), Tensor(valid))
        assert logits.shape == (2, VOCAB) and keys.shape == values.shape == shape
        np.testing.assert_allclose(logits.asnumpy(), full[rows, valid - 1], atol=1e-5, rtol=0)
        for _ in range(4):
            new = tokens[rows, valid][:, None]
            valid = valid + 1
            logits, keys, values = run_decode(Tensor(new), Tensor(valid), keys, values)
            np.testing.assert_allclose(logits.asnumpy(), full[rows, valid - 1], atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path):
    hf, cfg, ckpt = _converted(tmp_path)
    net = QwenForCausalLM(cfg)
    load_weights(net, ckpt)
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    expected = out[0, len(prompt):].tolist()
    assert greedy_generate(net, prompt, 6) == expected
    # generation stops at (and includes) the first eos id
    assert greedy_generate(net, prompt, 6, eos_ids=[expected[2]]) == expected[:expected.index(expected[2]) + 1]


def test_load_weights_lists_every_mismatch(tmp_path):
    _, cfg, ckpt = _converted(tmp_path)
    good = ms.load_checkpoint(str(ckpt))
    entries = [{"name": n, "data": p} for n, p in good.items() if n not in ("model.layers.1.ffn_norm.weight",
                                                                          CONFIG_ENTRY)]
    entries.append({"name": "model.extra.weight", "data": Tensor(np.zeros(3, np.float32))})
    entries.append({"name": "adam_m.lm_head.weight", "data": Tensor(np.zeros(3, np.float32))})
    for e in entries:
        if e["name"] == "model.norm_out.weight":
            e["data"] = Tensor(np.ones(31, np.float32))
    bad = tmp_path / "bad.ckpt"
    ms.save_checkpoint(entries, str(bad))
    with pytest.raises(UserError) as err:
        load_weights(QwenForCausalLM(cfg), bad)
    text = str(err.value)
    assert "missing (1): model.layers.1.ffn_norm.weight" in text
    assert "unexpected (1): model.extra.weight" in text  # optimizer state is ignored, not reported
    assert "wrong shape (1): model.norm_out.weight (31,) (expected (32,))" in text
    with pytest.raises(UserError, match="does not exist"):
        load_weights(QwenForCausalLM(cfg), tmp_path / "nothing.ckpt")
