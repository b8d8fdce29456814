"""Training sides that take turns: each side trains in a process of its own, driven over its stdin, so that its peak
RSS is its own and no framework's threads share a process with another's; the sides advance --block steps in turn
(a neighbour's burst on a shared machine slows all alike), or with block 0 run one after the other."""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterator


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def serve(steps: Iterator[tuple[float, float]], ready: dict) -> int:
    """The side's end of the protocol: after a "ready" line (JSON, with `ready`'s values), each line "N" of stdin runs
    up to N more (loss, seconds) steps and answers them; end of input answers the peak RSS."""
    say = lambda value: print(json.dumps(value), flush=True)  # noqa: E731
    say({"ready": True, **ready})
    for line in sys.stdin:
        losses, seconds = [], []
        for loss, took in itertools.islice(steps, int(line)):
            losses.append(loss)
            seconds.append(took)
        say({"loss": losses, "seconds": seconds})
    say({"peak_rss_mb": peak_rss_mb()})
    return 0


class Side:
    """A side's process (`script --side NAME` with the given options), its steps so far and its memory."""

    def __init__(self, script: str, name: str, options: list[str]):
        argv = [sys.executable, str(Path(script).resolve()), "--side", name, *options]
        self.name, self.loss, self.seconds = name, [], []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.result = self.answer()

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{self.name} stopped (exit {self.proc.wait()})")

    def run(self, steps: int) -> bool:
        """Up to `steps` more steps; False once the side has no more."""
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        done = self.answer()
        self.loss += done["loss"]
        self.seconds += done["seconds"]
        return len(done["loss"]) == steps

    def finish(self) -> dict:
        self.proc.stdin.close()
        self.result.update(self.answer(), loss=self.loss, seconds=self.seconds)
        self.proc.wait()
        return self.result


def measure(script: str, names: tuple[str, ...], options: list[str], steps: int, block: int) -> dict[str, dict]:
    """Every side to its end: taking turns every `block` steps, or (block 0) one after the other, each process gone
    before the next starts (0.5B-shaped sides do not fit in memory together)."""
    if not block:
        results = {}
        for name in names:
            side = Side(script, name, options)
            side.run(steps)
            results[name] = side.finish()
        return results
    sides = [Side(script, name, options) for name in names]
    active = list(sides)
    while active:
        for side in list(active):
            if not side.run(block):
                active.remove(side)
    return {side.name: side.finish() for side in sides}


def tokens_per_s(seconds: list[float], tokens_per_step: int) -> float:
    steady = seconds[1:] or seconds  # the first step compiles
    return tokens_per_step * len(steady) / sum(steady)


def options_of(args, leave_out: tuple[str, ...] = ("side", "block", "repeats")) -> list[str]:
    """The parsed options as a side's command line takes them again."""
    return [f"--{k}={v}" for k, v in vars(args).items() if k not in leave_out and v is not None]
