"""qwenbuild's build graph for doit: `doit finetune`, `doit export`, `doit list`; `doit manifest=PATH ...` picks
another qwen.toml (default ./qwen.toml)."""

import doit

from qwenbuild.tasks.graph import dodo_namespace

globals().update(dodo_namespace(doit.get_var("manifest", "qwen.toml")))
