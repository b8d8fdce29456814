"""MINDIR export: the original layout, sidecars that match the graphs, external weights, a normalised digest
that is stable across processes, and clear errors that leave nothing behind."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

from qwenbuild.errors import UserError
from qwenbuild.digests import load_model_proto, mindir_digest
from qwenbuild.export import export_mindir
from qwenbuild.export.graph_files import FULL, INC, graph_file, sidecar_file, variables_dir
from qwenbuild.model.config import QwenConfig
from qwenbuild.digests import file_digest

SEQ = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwenbuild.weights import convert_weight

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64,
                                 max_position_embeddings=64)).save_pretrained(root / "hf")
    convert_weight(root / "hf", root / "m.ckpt", progress=None)
    cfg = QwenConfig.from_hf_dir(root / "hf")
    summary = export_mindir(cfg, root / "m.ckpt", root / "out", rank=0, batch_size=2, seq_length=SEQ, progress=None)
    return {"root": root, "cfg": cfg, "ckpt": root / "m.ckpt", "out": root / "out", "summary": summary}


def test_original_layout_and_nothing_else(model):
    out = model["out"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["mindir_full_checkpoint", "mindir_full_checkpoint/rank_0_graph.json",
                     "mindir_full_checkpoint/rank_0_graph.mindir", "mindir_inc_checkpoint",
                     "mindir_inc_checkpoint/rank_0_graph.json", "mindir_inc_checkpoint/rank_0_graph.mindir"]
    assert model["summary"][FULL]["mindir"] == str(graph_file(out, FULL, 0))
    assert model["summary"][INC]["variables"] is None


@pytest.mark.parametrize("kind", [FULL, INC])
def test_sidecar_describes_the_graph_it_sits_next_to(model, kind):
    cfg, out = model["cfg"], model["out"]
    doc = json.loads(sidecar_file(out, kind, 0).read_text())
    proto = load_model_proto(graph_file(out, kind, 0))
    graph_inputs = [(i.name.rsplit(":", 1)[-1], list(i.tensor[0].dims)) for i in proto.graph.input]
    assert graph_inputs == [(t["name"], t["shape"]) for t in doc["inputs"]]
    assert [t["shape"] for t in doc["outputs"]] == [[2, 96]]
    # MindFormers r1.0's signature: the KV cache is graph state, addressed by batch_index and zactivate_len
    assert [(t["name"], t["dtype"], t["shape"]) for t in doc["inputs"]] == [
        ("input_ids", "int32", [2, SEQ] if kind == FULL else [2, 1]), ("batch_valid_length", "int32", [2]),
        ("batch_index", "int64", [2]), ("zactivate_len", "int64", [SEQ])]
    state = {p.name.rsplit(":", 1)[-1]: list(p.dims) for p in proto.graph.parameter if "kvcache_mgr" in p.name}
    assert doc["kv_cache"]["parameters"] == sorted(state, key=doc["kv_cache"]["parameters"].index)
    assert set(doc["kv_cache"]["parameters"]) == set(state) and len(state) == 2 * cfg.num_layers
    assert all(shape == [2 * cfg.n_kv_heads * SEQ, cfg.head_dim] == doc["kv_cache"]["shape"]
               for shape in state.values())
    assert (doc["batch_size"], doc["seq_length"], doc["vocab_size"], doc["rank"]) == (2, SEQ, 96, 0)
    assert doc["mindir_digest"] == mindir_digest(graph_file(out, kind, 0)) == model["summary"][kind]["digest"]
    assert doc["eos_token_ids"] == [] and doc["pad_token_id"] is None  # vocab 96 holds no Qwen special ids
    assert doc["tokenizer"]["system_prompt"] == "You are a helpful assistant."



@pytest.mark.parametrize("kind", [FULL, INC])
def test_graphs_hold_qkv_and_gate_hidden_as_one_weight_each(model, kind):
    """As MindFormers' qkv_concat names them: w_qkv = wq | wk | wv (and its bias), w_gate_hidden = w1 | w3, stacked
    by output rows from the checkpoint; the parts are not in the graph."""
    import mindspore as ms
    from mindspore import nn

    ckpt = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(model["ckpt"])).items() if not isinstance(v, str)}
    held = {k: v.asnumpy() for k, v in nn.GraphCell(ms.load(str(graph_file(model["out"], kind, 0))))
            .parameters_dict().items()}
    for i in range(model["cfg"].num_layers):
        a, f = f"model.layers.{i}.attention.", f"model.layers.{i}.feed_forward."
        for fused, parts in ((a + "w_qkv.weight", ("wq.weight", "wk.weight", "wv.weight")),
                             (a + "w_qkv.bias", ("wq.bias", "wk.bias", "wv.bias")),
                             (f + "w_gate_hidden.weight", ("w1.weight", "w3.weight"))):
            prefix = fused.rsplit(".", 2)[0] + "."
            np.testing.assert_array_equal(held[fused], np.concatenate([ckpt[prefix + p] for p in parts]))
            assert not {prefix + p for p in parts} & set(held)
        np.testing.assert_array_equal(held[f + "w2.weight"], ckpt[f + "w2.weight"])


@pytest.fixture(scope="module")
def tied(model):
    """The fixture's model with the output projection tied to the embedding (as Qwen1.5-0.5B is), exported alike."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwenbuild.weights import convert_weight

    root = model["root"] / "tied"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(root / "hf")
    convert_weight(root / "hf", root / "m.ckpt", progress=None)
    cfg = QwenConfig.from_hf_dir(root / "hf")
    assert cfg.tie_word_embeddings
    export_mindir(cfg, root / "m.ckpt", root / "out", rank=0, batch_size=2, seq_length=SEQ, progress=None)
    return {"hf": root / "hf", "out": root / "out"}


def _operators(path) -> collections.Counter:
    """How many nodes of each operator a MINDIR graph holds (a node's op_type is "REF::Name:N")."""
    proto = load_model_proto(path)
    return collections.Counter(node.op_type.split("::")[-1].split(":")[0]
                               for graph in [proto.graph, *proto.functions] for node in graph.node)


@pytest.mark.parametrize("kind", [FULL, INC])
def test_tied_graphs_run_the_kernels_of_untied_ones(model, tied, kind):
    """A tied model's graphs read the embedding table once per call for the lookup and the output projection: read
    a second time after the cache writes, MindSpore copied the whole table first (a TensorMove per read, 75 ms a
    token at Qwen1.5-0.5B's shape). Only the lm_head parameter's Load (and its entry in the tuple of loads) is
    missing."""
    tied_ops, untied_ops = _operators(graph_file(tied["out"], kind, 0)), _operators(graph_file(model["out"], kind, 0))
    assert tied_ops["TensorMove"] == untied_ops["TensorMove"] == 0
    bookkeeping = {"Load", "MakeTuple"}
    assert {k: n for k, n in tied_ops.items() if k not in bookkeeping} == \
        {k: n for k, n in untied_ops.items() if k not in bookkeeping}
    assert untied_ops["Load"] - tied_ops["Load"] == 1


def test_tied_graphs_logits_equal_transformers(tied):
    """Prefill, then two decode calls on both rows of the batch: the logits of transformers' tied model."""
    import torch
    from transformers import Qwen2ForCausalLM
    from qwenbuild.infer.backends import GraphCellBackend

    backend = GraphCellBackend(graph_file(tied["out"], FULL, 0), graph_file(tied["out"], INC, 0))
    prompt, follow = [5, 17, 42, 9], [7, 60]
    ids = np.zeros((2, SEQ), np.int32)
    ids[:, :len(prompt)] = prompt
    rows, window = np.arange(2, dtype=np.int64), np.zeros((SEQ,), np.int64)
    steps = [backend.prefill(ids, np.full((2,), len(prompt), np.int32), rows, window)]
    for t, token in enumerate(follow):
        steps.append(backend.decode(np.full((2, 1), token, np.int32), np.full((2,), len(prompt) + t + 1, np.int32),
                                    rows, window))
    hf = Qwen2ForCausalLM.from_pretrained(tied["hf"]).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt + follow])).logits[0, len(prompt) - 1:].numpy()
    for got, want in zip(steps, expected):
        np.testing.assert_allclose(got, np.stack([want, want]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [FULL, INC])
def test_graphs_hold_only_mindspores_own_kernels(model, kind):
    """Training runs the fused CPU kernels (Custom ops from a library on this machine); MindSpore Lite could not run
    them, so the exported graphs hold the composed ones."""
    from qwenbuild.model.fused_kernels import kernels

    assert kernels() is not None  # they are in use here, so leaving them out is what is tested
    graph = graph_file(model["out"], kind, 0).read_bytes()
    assert b"fused_kernels" not in graph and b"Custom" not in graph


def test_reexport_in_a_new_process_gives_the_same_normalised_digest(model, tmp_path):
    # compile something in this process first: MINDIR names count compilations, export must not depend on it
    import mindspore as ms
    from qwenbuild.model.network import QwenForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    QwenForCausalLM(model["cfg"])(ms.Tensor(np.ones((1, 4), np.int32)))
    proc = subprocess.run([sys.executable, "-m", "qwenbuild", "export", "--load_checkpoint", model["ckpt"],
                           "--torch_ckpt_dir", model["root"] / "hf", "--output_dir", tmp_path / "again",
                           "--seq_length", str(SEQ), "--batch_size", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for kind in (FULL, INC):
        first, second = graph_file(model["out"], kind, 0), graph_file(tmp_path / "again", kind, 0)
        assert mindir_digest(first) == mindir_digest(second)
        # the raw bytes differ: compile_phase embeds a per-process id
        assert file_digest(first) != file_digest(second)


def test_digest_ignores_only_compile_phase_and_primitive_order(model, tmp_path):
    original = graph_file(model["out"], FULL, 0)
    base = mindir_digest(original)

    def variant(name, change):
        proto = load_model_proto(original)
        change(proto)
        path = tmp_path / name
        path.write_bytes(proto.SerializeToString())
        return mindir_digest(path)

    def set_phase(p):
        next(a for a in p.graph.attribute if a.name == "compile_phase").s = b"export.mindir.1.2.0...0"

    def reverse_primitives(p):
        prims = list(p.primitives)[::-1]
        del p.primitives[:]
        p.primitives.extend(prims)

    def bump_weight(p):
        raw = bytearray(p.graph.parameter[0].raw_data)
        raw[0] ^= 1
        p.graph.parameter[0].raw_data = bytes(raw)

    def rename_node(p):
        p.graph.node[0].name += "_x"

    assert len(load_model_proto(original).primitives) > 1
    assert variant("phase.mindir", set_phase) == base
    assert variant("order.mindir", reverse_primitives) == base
    assert variant("weight.mindir", bump_weight) != base
    assert variant("node.mindir", rename_node) != base


@pytest.mark.slow
def test_external_weights_layout_same_logits_and_digest_covers_them(model, tmp_path):
    import mindspore as ms
    from mindspore import nn

    out = tmp_path / "ext"
    export_mindir(model["cfg"], model["ckpt"], out, rank=1, batch_size=2, seq_length=SEQ, external_weights=True,
                  progress=None)
    for kind in (FULL, INC):
        assert (variables_dir(out, kind, 1) / "data_0").is_file()
        assert json.loads(sidecar_file(out, kind, 1).read_text())["variables"] == "rank_1_variables"
    ids = ms.Tensor(np.arange(2 * SEQ, dtype=np.int32).reshape(2, SEQ) % 96)
    args = (ids, ms.Tensor(np.array([5, SEQ], np.int32)), ms.Tensor(np.arange(2, dtype=np.int64)),
            ms.Tensor(np.zeros((SEQ,), np.int64)))
    split = nn.GraphCell(ms.load(str(graph_file(out, FULL, 1))))(*args).asnumpy()
    whole = nn.GraphCell(ms.load(str(graph_file(model["out"], FULL, 0))))(*args).asnumpy()
    np.testing.assert_array_equal(split, whole)
    digest = mindir_digest(graph_file(out, FULL, 1))
    data = variables_dir(out, FULL, 1) / "data_0"
    data.chmod(0o600)
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert mindir_digest(graph_file(out, FULL, 1)) != digest
    # exporting again without external weights removes the stale variables directory
    export_mindir(model["cfg"], model["ckpt"], out, rank=1, batch_size=2, seq_length=SEQ, progress=None)
    assert not variables_dir(out, FULL, 1).exists() and not variables_dir(out, INC, 1).exists()
    assert json.loads(sidecar_file(out, FULL, 1).read_text())["variables"] is None


def test_the_graphs_hold_the_weights_in_the_deployment_dtype(model, tmp_path):
    """export.dtype (qwenbuild export --dtype, as convert_weight spells dtypes): the weights go into the graphs cast
    to it; the graphs still run on CPU, casting on use."""
    import mindspore as ms
    from mindspore import nn

    from qwenbuild.cli import main
    from qwenbuild.model.params import is_cache_name
    from qwenbuild.weights.mindspore_ckpt import read_array, read_tensors

    dtype, out = "bfloat16", tmp_path / "bf16"
    assert main(["export", "--load_checkpoint", str(model["ckpt"]), "--torch_ckpt_dir", str(model["root"] / "hf"),
                 "--output_dir", str(out), "--seq_length", str(SEQ), "--batch_size", "2", "--dtype", "bf16"]) == 0
    assert json.loads(sidecar_file(out, FULL, 0).read_text())["model"]["param_dtype"] == dtype
    cell = nn.GraphCell(ms.load(str(graph_file(out, FULL, 0))))
    params = cell.parameters_dict()
    weights = {name: p for name, p in params.items() if not is_cache_name(name)}
    assert {str(p.dtype) for p in weights.values()} == {"BFloat16"}
    source = {t.name: read_array(t) for t in read_tensors(model["ckpt"]) if t.type_name != "str"}
    for name in ("model.norm_out.weight", "model.layers.1.attention.wo.weight", "lm_head.weight"):
        cast = ms.Tensor(source[name]).astype(getattr(ms, dtype)).float().asnumpy()
        np.testing.assert_array_equal(weights[name].float().asnumpy(), cast)
    ids = ms.Tensor(np.arange(2 * SEQ, dtype=np.int32).reshape(2, SEQ) % 96)
    args = (ids, ms.Tensor(np.array([5, SEQ], np.int32)), ms.Tensor(np.arange(2, dtype=np.int64)),
            ms.Tensor(np.zeros((SEQ,), np.int64)))
    low = cell(*args).asnumpy()
    whole = nn.GraphCell(ms.load(str(graph_file(model["out"], FULL, 0))))(*args).asnumpy()
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, whole, rtol=0, atol=0.02 * np.abs(whole).max())
    assert not np.array_equal(low, whole)  # the rounding did happen


def _shard(model, path):
    import mindspore as ms

    params = ms.load_checkpoint(str(model["ckpt"]))
    entries = []
    for name, value in params.items():
        if isinstance(value, str):  # the stored config.json
            continue
        data = value.asnumpy()
        if name.endswith("attention.wq.weight"):
            data = data[: data.shape[0] // 2]  # the first half of an mp=2 column split
        entries.append({"name": name, "data": ms.Tensor(data)})
    ms.save_checkpoint(entries, str(path))
    return path


def test_bad_inputs_are_user_errors_and_write_nothing(model, tmp_path):
    cfg, out = model["cfg"], tmp_path / "out"
    with pytest.raises(UserError, match="does not exist"):
        export_mindir(cfg, tmp_path / "none.ckpt", out, seq_length=SEQ, progress=None)
    with pytest.raises(UserError, match="seq_length 1 must lie in 2..64"):
        export_mindir(cfg, model["ckpt"], out, seq_length=1, progress=None)
    with pytest.raises(UserError, match="batch_size must lie in 1..4096"):
        export_mindir(cfg, model["ckpt"], out, batch_size=0, seq_length=SEQ, progress=None)
    with pytest.raises(UserError, match=r"(?s)wrong shape.*a shard of a tensor-parallel plan"):
        export_mindir(cfg, _shard(model, tmp_path / "shard.ckpt"), out, seq_length=SEQ, progress=None)
    leftovers = [p for p in out.rglob("*") if p.is_file() or p.name.startswith(".")] if out.exists() else []
    assert leftovers == []


def test_failed_reexport_keeps_the_previous_export(model, tmp_path):
    import shutil

    out = tmp_path / "keep"
    shutil.copytree(model["out"], out)
    before = {p: file_digest(p) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError):
        export_mindir(model["cfg"], _shard(model, tmp_path / "shard.ckpt"), out, batch_size=2, seq_length=SEQ,
                      progress=None)
    assert {p: file_digest(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p for p in out.rglob(".*")] == []
