"""doit on qwenbuild's task graph without a dodo.py: `python -m qwenbuild.tasks.run_doit [doit arguments]
manifest=PATH build_dir=DIR` (what `qwenbuild verify` runs for its fresh rebuild)."""

from __future__ import annotations

import sys

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from qwenbuild.tasks.graph import dodo_namespace


def main(argv: list[str]) -> int:
    variables = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    namespace = dodo_namespace(variables.get("manifest", "qwen.toml"), variables.get("build_dir"),
                               argv=["run_doit", *argv])
    return DoitMain(ModuleTaskLoader(namespace)).run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
