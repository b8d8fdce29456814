"""Training progress: one line per step, a bar on a terminal, and the results (metrics.json, loss.png)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json
from qwenbuild.logs import shows
from qwenbuild.store import atomic_path

logger = logging.getLogger(__name__)

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([\d.eE+-]+|nan|inf) lr ([\d.eE+-]+) ")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def step_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> str:
    return f"step {step}/{total} loss {loss:.4f} lr {lr:.3e} tokens/s {tokens_per_s:.0f} eta {duration(eta_s)}"


def bar(step: int, total: int, width: int = 30) -> str:
    done = int(width * step / max(total, 1))
    return f"[{'#' * done}{'.' * (width - done)}] {100 * step / max(total, 1):3.0f}%"


class Progress:
    """Logs step lines; on a terminal, redraws a bar under them on stderr while they are shown."""

    def __init__(self, total: int, first_step: int = 0, show_bar: bool | None = None):
        self.total = total
        self.first_step = first_step
        self.show_bar = sys.stderr.isatty() and shows() if show_bar is None else show_bar
        self.started = None

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """Report finished step `step` (1-based) that took `seconds` and trained `tokens` tokens."""
        if self.started is None:
            self.started = (time.monotonic() - seconds, step - 1)
        t0, s0 = self.started
        per_step = (time.monotonic() - t0) / max(step - s0, 1)
        self.line(step_line(step, self.total, loss, lr, tokens / max(seconds, 1e-9), per_step * (self.total - step)),
                  step)

    def line(self, text: str, step: int | None = None) -> None:
        if self.show_bar:
            sys.stderr.write("\r\033[K")
        logger.info(text)
        if self.show_bar and step is not None:
            sys.stderr.write(bar(step, self.total))
            sys.stderr.flush()

    def close(self) -> None:
        if self.show_bar:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def read_metrics(path: str | Path) -> dict:
    """The figures a metrics file holds already ({} when there is none); one that is not a JSON object is refused,
    not overwritten."""
    path = Path(path)
    if not path.is_file():
        return {}
    current = read_json(path, "metrics file", hint="qwenbuild merges its figures into a JSON object")
    if not isinstance(current, dict):
        raise UserError(f"metrics file {path} holds a JSON {type(current).__name__}, not an object of figures",
                        hint="name a new file, or a metrics.json qwenbuild wrote")
    return current


def write_metrics(path: str | Path, metrics: dict, merge: bool = True) -> Path:
    """Write `metrics` to the JSON file at `path`, merged into what is there (evaluation adds to training's)."""
    path = Path(path)
    current = read_metrics(path) if merge else {}
    current.update(metrics)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def plot_loss(path: str | Path, losses: list[float], lrs: list[float]) -> Path:
    # matplotlib loads slowly: imported only to draw the plot
    import matplotlib

    matplotlib.use("Agg")
    # pyplot only after choosing the backend that draws to files, with no display
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, lrs, color="tab:orange", label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("training loss and learning rate")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
