"""One training worker: `python -m qwenbuild.train.worker --config run.json`, alone or as an msrun worker.

Under msrun (MS_ROLE set) it joins the world group first; the data- and model-parallel groups follow from the
strategy files (train.finetune).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from qwenbuild.errors import UserError
from qwenbuild.logs import configure, entry_logger
from qwenbuild.processes import follow_parent
from qwenbuild.train.finetune import finetune
from qwenbuild.train.settings import read_run_json

# started as `python -m`, this module is __main__: its lines go under its package name all the same
logger = entry_logger(__file__)

ERROR_MARK = "qwenbuild worker error:"


def init_data_parallel(device_target: str) -> tuple[int, int]:
    """(rank, world size): join msrun's group when launched by it, else a single worker."""
    if not os.environ.get("MS_ROLE"):
        return 0, 1
    follow_parent()  # msrun decides on Ctrl-C, and msrun gone (killed with the build) means this worker goes too
    # mindspore takes seconds to load: imported only when this runs
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_context(mode=ms.GRAPH_MODE, device_target=device_target)
    init()
    world = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    return get_rank(), world


def exit_code(run: Callable[[], None]) -> int:
    """Run a worker; a UserError becomes one marked line in the worker's log (msrun's failure report finds it)."""
    try:
        run()
    except UserError as exc:
        logger.error(f"{ERROR_MARK} {exc}")
        return 2
    return 0


def _train(config: str) -> None:
    settings = read_run_json(config)
    process, processes = init_data_parallel(settings.device_target)
    finetune(settings, process, processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenbuild.train.worker", description=__doc__)
    parser.add_argument("--config", required=True, help="run.json with the plain training settings")
    args = parser.parse_args(argv)
    return exit_code(lambda: _train(args.config))


if __name__ == "__main__":
    configure()  # this process's lines in its msrun log, at the level QWENBUILD_LOG asks for
    sys.exit(main())
