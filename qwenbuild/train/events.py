"""TensorBoard event files of a training run, written with tensorboardX as MindFormers writes its own: one directory
per rank under <output_dir>/tensorboard, MindFormers' tags where it has one (loss, learning-rate, grad-norm)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TENSORBOARD = "tensorboard"
LOSS = "loss"
LEARNING_RATE = "learning-rate"
GRAD_NORM = "grad-norm"
TOKENS_PER_S = "tokens-per-second"
HELDOUT_ACCURACY = "heldout-accuracy"
# the files SummaryWriter names: events.out.tfevents.<time>.<host><suffix>
EVENT_FILES = "events.out.tfevents.*"


def tensorboard_dir(output_dir: str | Path) -> Path:
    """What `tensorboard --logdir` is given; MindFormers writes rank_N/ below it."""
    return Path(output_dir) / TENSORBOARD


def rank_dir(output_dir: str | Path, rank: int = 0) -> Path:
    return tensorboard_dir(output_dir) / f"rank_{rank}"


def clear(output_dir: str | Path) -> None:
    """Remove the event files of an earlier run (a new run starts its curves afresh); nothing else is touched."""
    root = tensorboard_dir(output_dir)
    for path in root.glob(f"rank_*/{EVENT_FILES}") if root.is_dir() else ():
        path.unlink()


def summary_writer_class():
    """tensorboardX's SummaryWriter. tensorboardX imports torch, when it is installed, only to accept torch tensors,
    which no run passes: in a training worker that cost seconds and 180 MB, so torch is hidden while it loads."""
    # MindSpore's generated protobuf modules load only under protobuf's pure-Python implementation, which MindSpore
    # chooses when it is imported first: choose it here too, or mindspore fails to import after tensorboardX
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        # tensorboardX loads protobuf: imported only when a run logs
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX takes as "no torch"
    try:
        # tensorboardX loads protobuf: imported only when a run logs
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class EventLog:
    """Scalars by step into a new event file of `directory` (a file per run; TensorBoard joins them by step)."""

    def __init__(self, directory: str | Path):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.writer = summary_writer_class()(logdir=str(directory), flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
