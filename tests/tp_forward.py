"""An msrun worker for the tensor-parallel tests: each case's sharded model, run across the model-parallel
processes, writes its gathered logits (process 0) to <case>/logits.npy.

Usage: tp_forward.py CASES_JSON, a list of {"strategy": dir, "shards": dir, "pipeline_stage": n, "out": file};
config.json and input_ids.npy sit next to CASES_JSON.
"""

import json
import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script by msrun: the tests folder must not shadow anything

import mindspore as ms
import numpy as np
from mindspore.communication import get_group_size, get_rank, init

from qwenbuild.model.config import QwenConfig
from qwenbuild.model.network import QwenForCausalLM
from qwenbuild.model.tensor_parallel import GatherLastDim, ModelParallel, create_groups
from qwenbuild.parallel.rank_layout import process_layout
from qwenbuild.train import checkpoint


def main(cases_json: str) -> None:
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    process, processes = get_rank(), get_group_size()
    root = Path(cases_json).parent
    cfg = QwenConfig.from_hf_dir(root / "hf")
    ids = ms.Tensor(np.load(root / "input_ids.npy"))
    for case in json.loads(Path(cases_json).read_text()):
        layout = process_layout(case["strategy"], process, processes, case["pipeline_stage"])
        create_groups(layout)
        net = QwenForCausalLM(cfg, ModelParallel(layout))
        paths = [checkpoint.init_checkpoint_file(case["shards"], r) for r in layout.ranks]
        checkpoint.load_into(net, paths, [p.name for p in net.get_parameters()])
        logits = net(ids)
        if net.vocab_parallel:
            logits = GatherLastDim(net.parallel)(logits)
        if process == 0:
            np.save(case["out"], logits.asnumpy())
        print(f"case {case['out']}: process {process} holds ranks {layout.ranks}, mp index {layout.mp_index}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
