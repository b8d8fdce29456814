"""Two ways to run the exported graphs, one interface: prefill(...) and decode(...) -> logits, each called with
(input_ids, batch_valid_length, batch_index, zactivate_len) as MindFormers' text generator feeds them.

The KV cache is state inside the graphs: the decode graph must continue from the prefill's. MindSpore Lite shares
it between the two models of one ModelGroup (SHARE_WEIGHT); two GraphCells do not share Parameters, so the
GraphCell backend copies the prefill's cache into the decode graph once per request.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from qwenbuild.errors import UserError
from qwenbuild.model.params import is_cache_name

BACKENDS = ("auto", "graphcell", "lite")


class GraphCellBackend:
    """MindSpore on CPU: nn.GraphCell over ms.load(MINDIR); the cache stays in MindSpore tensors between steps."""

    name = "graphcell"

    def __init__(self, full_path: Path, inc_path: Path):
        # mindspore takes seconds to load: imported only when this runs
        import mindspore as ms
        from mindspore import nn

        _use_cpu(ms)
        self._tensor = ms.Tensor
        self.full = nn.GraphCell(_load_graph(ms, full_path))
        self.inc = nn.GraphCell(_load_graph(ms, inc_path))
        self._run_full, self._run_inc = _Runner(self.full), _Runner(self.inc)
        full, inc = self.full.parameters_dict(), self.inc.parameters_dict()
        self._caches = [(full[name], inc[name]) for name in full if is_cache_name(name) and name in inc]
        if not self._caches:
            raise UserError(f"{full_path} keeps no KV cache inside the graph (an export of an earlier qwenbuild)",
                            hint="export the graphs again: `doit export`, or `qwenbuild export`")

    def _call(self, runner, arrays):
        return runner(*[self._tensor(a) for a in arrays]).asnumpy()

    def prefill(self, *arrays: np.ndarray) -> np.ndarray:
        logits = self._call(self._run_full, arrays)
        for prompt_cache, decode_cache in self._caches:
            decode_cache.set_data(prompt_cache)
        return logits

    def decode(self, *arrays: np.ndarray) -> np.ndarray:
        return self._call(self._run_inc, arrays)


class _Runner:
    """Calls a GraphCell; once it has compiled, straight through MindSpore's graph executor with the phase it
    compiled under. GraphCell.__call__ derives the compile key from the arguments on every call, 0.3 ms a token."""

    def __init__(self, cell):
        self.cell, self.run = cell, None

    def __call__(self, *tensors):
        if self.run is not None:
            return self.run(self.cell, *tensors, phase=self.cell.phase)
        out = self.cell(*tensors)
        try:
            # mindspore is loaded by now (the backend imported it); its executor is not public API, hence the guard
            from mindspore.common.api import _cell_graph_executor
        except ImportError:  # another MindSpore: every call goes through GraphCell
            self.run = lambda cell, *tensors, phase: cell(*tensors)
        else:
            self.run = _cell_graph_executor
        return out


def _load_graph(ms, path: Path):
    try:
        return ms.load(str(path))
    except (RuntimeError, ValueError, TypeError) as exc:  # MindSpore's words for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a MINDIR graph MindSpore can load ({first})",
                        hint="export it again: `doit export`, or `qwenbuild export`") from None


def _use_cpu(ms) -> None:
    try:
        ms.set_device("CPU")
    except RuntimeError:
        pass  # the device is fixed once a kernel has run in this process; graphs load wherever that is
    ms.set_context(mode=ms.GRAPH_MODE)


class LiteBackend:
    """MindSpore Lite on Ascend with the GE provider and lite.ini, as run_qwen1_5_mslite_infer.py builds it:
    both graphs in one ModelGroup sharing weights and the KV cache, inputs set from numpy."""

    name = "lite"

    def __init__(self, full_path: Path, inc_path: Path, config_path=None, device_id: int = 0, rank_id: int = 0):
        mslite = import_lite()
        context = mslite.Context()
        context.target = ["Ascend"]
        context.ascend.device_id = device_id
        context.ascend.rank_id = rank_id
        context.ascend.provider = "ge"
        self.full, self.inc = mslite.Model(), mslite.Model()
        group = mslite.ModelGroup(mslite.ModelGroupFlag.SHARE_WEIGHT)
        group.add_model([self.full, self.inc])
        config = str(config_path) if config_path else ""
        self.full.build_from_file(str(full_path), mslite.ModelType.MINDIR, context, config)
        self.inc.build_from_file(str(inc_path), mslite.ModelType.MINDIR, context, config)

    @staticmethod
    def _run(model, arrays) -> list:
        inputs = model.get_inputs()
        if len(inputs) != len(arrays):
            raise UserError(f"the MINDIR takes {len(inputs)} inputs, the runtime has {len(arrays)}",
                            hint="re-export the graphs with this version of qwenbuild")
        for tensor, array in zip(inputs, arrays):
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
        return [out.get_data_to_numpy() for out in model.predict(inputs)]

    def prefill(self, *arrays: np.ndarray) -> np.ndarray:
        return self._run(self.full, list(arrays))[0]

    def decode(self, *arrays: np.ndarray) -> np.ndarray:
        return self._run(self.inc, list(arrays))[0]


def import_lite():
    try:
        return importlib.import_module("mindspore_lite")
    except ImportError as exc:
        raise UserError(f"--backend lite needs the mindspore_lite package, which cannot be imported here ({exc})",
                        hint="install the mindspore-lite wheel matching your CANN on the Ascend host, "
                             "or use --backend graphcell (MindSpore on CPU)") from None


def lite_importable() -> bool:
    try:
        importlib.import_module("mindspore_lite")
    except ImportError:
        return False
    return True


def resolve_backend(name: str, ge_config_path=None) -> str:
    """The backend `name` stands for: auto = lite when mindspore_lite imports and a lite.ini is given."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "lite" if ge_config_path is not None and lite_importable() else "graphcell"
    return name


def open_backend(name: str, full_path: Path, inc_path: Path, *, ge_config_path=None, device_id: int = 0,
                 rank_id: int = 0):
    """auto = lite when mindspore_lite imports and a lite.ini is given, graphcell otherwise."""
    if ge_config_path is not None and not Path(ge_config_path).is_file():
        raise UserError(f"--ge_config_path {ge_config_path} does not exist",
                        hint="write it with `doit lite_ini` or leave the flag out")
    name = resolve_backend(name, ge_config_path)
    if name == "lite":
        return LiteBackend(full_path, inc_path, ge_config_path, device_id, rank_id)
    return GraphCellBackend(full_path, inc_path)
