"""Write a commented qwen.toml from a preset.

Presets carry the real dimensions of every Qwen1.5 size and a starting plan: `tiny` runs end to end on a CPU
machine; `qwen1.5-72b` reproduces the original 4 nodes x 8 Ascend devices setup (dp 1, mp 8, pp 4)."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.manifest._presets import MODELS
from qwenbuild.manifest._template import render
from qwenbuild.store import atomic_path


def add_arguments(parser):
    parser.add_argument("--preset", default="tiny", choices=list(MODELS), help="model size (default: tiny)")
    parser.add_argument("-o", "--output", default="qwen.toml", metavar="PATH", help="where to write (default: qwen.toml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def main(args):
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists", hint="pass --force to overwrite it, or -o another path")
    with atomic_path(out) as tmp:
        tmp.write_text(render(args.preset), encoding="utf-8")
    print(f"wrote {out} (preset {args.preset}); check it with `qwenbuild validate -c {out}`")
