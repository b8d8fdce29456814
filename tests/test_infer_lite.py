"""The lite backend against the documented mindspore_lite 2.x Python API.

mindspore_lite cannot be installed here (its only PyPI wheel is for CPython 3.7 and reads MINDIR version 1), so
the backend was NOT run against the real package. Instead a stand-in module enforces the documented signatures
(Context, ModelGroup(flags), ModelGroupFlag, ModelType, Model.build_from_file(model_path, model_type,
context=None, config_path='', config_dict=None), get_inputs(), predict(inputs), Tensor.set_data_from_numpy,
get_data_to_numpy), checks every array against the input shapes and dtypes read from the MINDIR itself, and
computes with MindSpore's GraphCell, so the lite path must produce the graphcell path's tokens. The KV cache is
state inside the graphs, which a SHARE_WEIGHT ModelGroup shares between its models: the stand-in's group hands
the cache a model's call left to the group's other models.
"""

from __future__ import annotations

import enum
import types

import numpy as np
import pytest

from qwenbuild.digests import load_model_proto
from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.graph_files import FULL, INC
from qwenbuild.infer.backends import GraphCellBackend, LiteBackend, open_backend
from qwenbuild.infer.runtime import generate_ids, open_export

# mind_ir TensorProto.DataType codes: 6 INT32, 7 INT64, 1 FLOAT
MINDIR_DTYPES = {6: np.int32, 7: np.int64, 1: np.float32}


class ModelGroupFlag(enum.Enum):
    SHARE_WEIGHT = 1
    SHARE_WORKSPACE = 2
    SHARE_WEIGHT_WORKSPACE = 3


class ModelType(enum.Enum):
    MINDIR = 0
    MINDIR_LITE = 4


def _fake_lite(calls: list):
    class Ascend:
        device_id = rank_id = provider = None

    class Context:
        def __init__(self):
            calls.append(("Context",))
            self.target = None
            self.ascend = Ascend()

    class Tensor:
        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.data = list(shape), dtype, None

        def set_data_from_numpy(self, numpy_obj):
            assert isinstance(numpy_obj, np.ndarray) and numpy_obj.flags["C_CONTIGUOUS"]
            assert numpy_obj.dtype == self.dtype, (numpy_obj.dtype, self.dtype)
            assert list(numpy_obj.shape) == self.shape, (numpy_obj.shape, self.shape)
            self.data = numpy_obj.copy()

        def get_data_to_numpy(self):
            return self.data

    class Model:
        def build_from_file(self, model_path, model_type, context=None, config_path="", config_dict=None):
            assert isinstance(model_path, str) and model_path.endswith(".mindir")
            assert isinstance(model_type, ModelType) and isinstance(context, Context)
            assert isinstance(config_path, str)
            assert context.target == ["Ascend"] and context.ascend.provider == "ge"
            calls.append(("build_from_file", model_path, model_type, config_path, context.ascend.device_id,
                          context.ascend.rank_id))
            import mindspore as ms

            proto = load_model_proto(model_path)
            self.input_specs = [(list(i.tensor[0].dims), MINDIR_DTYPES[i.tensor[0].data_type])
                                for i in proto.graph.input]
            self.cell = ms.nn.GraphCell(ms.load(model_path))

        def get_inputs(self):
            return [Tensor(shape, dtype) for shape, dtype in self.input_specs]

        def predict(self, inputs, outputs=None):
            import mindspore as ms

            from qwenbuild.model.params import is_cache_name

            assert all(t.data is not None for t in inputs)
            results = self.cell(*[ms.Tensor(t.data) for t in inputs])
            results = results if isinstance(results, (tuple, list)) else [results]
            mine = self.cell.parameters_dict()
            for other in self.group:
                if other is not self:
                    for name, param in other.cell.parameters_dict().items():
                        if is_cache_name(name):
                            param.set_data(mine[name])
            out = []
            for r in results:
                t = Tensor(r.shape, r.asnumpy().dtype)
                t.data = r.asnumpy()
                out.append(t)
            return out

    class ModelGroup:
        def __init__(self, flags=ModelGroupFlag.SHARE_WORKSPACE):
            assert isinstance(flags, ModelGroupFlag)
            calls.append(("ModelGroup", flags))

        def add_model(self, models):
            assert isinstance(models, (list, tuple)) and all(isinstance(m, Model) for m in models)
            assert not any(hasattr(m, "cell") for m in models), "models join the group before they are built"
            calls.append(("add_model", len(models)))
            for m in models:
                m.group = list(models)

    return types.SimpleNamespace(Context=Context, Model=Model, ModelGroup=ModelGroup,
                                 ModelGroupFlag=ModelGroupFlag, ModelType=ModelType, Tensor=Tensor)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwenbuild.export import export_mindir
    from qwenbuild.model.config import QwenConfig
    from qwenbuild.weights import convert_weight

    root = tmp_path_factory.mktemp("lite")
    torch.manual_seed(3)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, initializer_range=0.2,
                                 max_position_embeddings=128)).save_pretrained(root / "hf")
    convert_weight(root / "hf", root / "m.ckpt", progress=None)
    export_mindir(QwenConfig.from_hf_dir(root / "hf"), root / "m.ckpt", root / "out", batch_size=2,
                  seq_length=32, progress=None)
    return root


def test_lite_backend_calls_and_tokens_match_graphcell(exported, monkeypatch):
    calls = []
    monkeypatch.setitem(__import__("sys").modules, "mindspore_lite", _fake_lite(calls))
    ini = write_lite_ini(exported / "lite.ini")
    info = open_export(exported / "out")
    lite = open_backend("auto", info.graph_path(FULL), info.graph_path(INC), ge_config_path=ini, device_id=3,
                        rank_id=0)
    assert isinstance(lite, LiteBackend)
    assert calls == [
        ("Context",),
        ("ModelGroup", ModelGroupFlag.SHARE_WEIGHT),
        ("add_model", 2),
        ("build_from_file", str(info.graph_path(FULL)), ModelType.MINDIR, str(ini), 3, 0),
        ("build_from_file", str(info.graph_path(INC)), ModelType.MINDIR, str(ini), 3, 0),
    ]
    prompts = [[5, 6, 7, 8], [100, 2]]
    graphcell = GraphCellBackend(info.graph_path(FULL), info.graph_path(INC))
    expected, _ = generate_ids(graphcell, info, prompts, 6, ())
    got, _ = generate_ids(lite, info, prompts, 6, ())
    assert got == expected and all(len(g) == 6 for g in got)


def test_auto_without_lite_ini_uses_graphcell(exported, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mindspore_lite", _fake_lite([]))
    info = open_export(exported / "out")
    assert isinstance(open_backend("auto", info.graph_path(FULL), info.graph_path(INC)), GraphCellBackend)
