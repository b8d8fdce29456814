"""Write a commented qwen.toml from a preset, and beside it the dodo.py that lets doit build it there.

Presets carry the real dimensions of every Qwen1.5 size and a starting plan: `tiny` runs end to end on a CPU
machine; `qwen1.5-72b` reproduces the original 4 nodes x 8 Ascend devices setup (dp 1, mp 8, pp 4)."""

from __future__ import annotations

from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.manifest._presets import MODELS
from qwenbuild.manifest._template import manifest_text
from qwenbuild.store import atomic_path

# the dodo.py `qwenbuild init` writes beside a qwen.toml (the repository's own dodo.py is the same file)
DODO_TEXT = '''"""qwenbuild's build graph for doit: `doit finetune`, `doit export`, `doit list`; `doit manifest=PATH ...` picks
another qwen.toml (default ./qwen.toml) and `build_dir=DIR` another build dir."""

import doit

from qwenbuild.tasks.graph import dodo_namespace

globals().update(dodo_namespace(doit.get_var("manifest", "qwen.toml"), doit.get_var("build_dir")))
'''


def add_arguments(parser):
    parser.add_argument("--preset", default="tiny", choices=list(MODELS), help="model size (default: tiny)")
    parser.add_argument("-o", "--output", default="qwen.toml", metavar="PATH", help="where to write (default: qwen.toml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def main(args):
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists", hint="pass --force to overwrite it, or -o another path")
    dodo = out.parent / "dodo.py"
    if dodo.exists() and dodo.read_text(encoding="utf-8", errors="replace") != DODO_TEXT and not args.force:
        raise UserError(f"{dodo} already exists and is not qwenbuild's", hint="pass --force to replace it, or "
                                                                              "-o a path in another directory")
    with atomic_path(out) as tmp:
        tmp.write_text(manifest_text(args.preset), encoding="utf-8")
    with atomic_path(dodo) as tmp:
        tmp.write_text(DODO_TEXT, encoding="utf-8")
    manifest = "" if out.name == "qwen.toml" else f" manifest={out.name}"
    print(f"wrote {out} (preset {args.preset}) and {dodo}; check it with `qwenbuild validate -c {out}`, "
          f"build with `doit{manifest} finetune` in {out.parent.resolve()}")
