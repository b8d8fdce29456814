"""qwenbuild's build graph for doit: `doit finetune`, `doit export`, `doit list`; `doit manifest=PATH ...` picks
another qwen.toml (default ./qwen.toml) and `build_dir=DIR` another build dir."""

import doit

from qwenbuild.tasks.graph import dodo_namespace

globals().update(dodo_namespace(doit.get_var("manifest", "qwen.toml"), doit.get_var("build_dir")))
