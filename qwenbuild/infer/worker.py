"""One rank of a tensor-parallel generation under msrun: `python -m qwenbuild.infer.worker SPEC.json`.

Every rank runs its own graphs (their all-reduces join the ranks' slices, so every rank sees the same logits and
picks the same tokens); rank 0 reports progress and writes the result to SPEC's result_file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwenbuild.errors import UserError
from qwenbuild.infer.runtime import generate, join_ranks
from qwenbuild.logs import configure, entry_logger
from qwenbuild.processes import follow_parent

# started as `python -m`, this module is __main__: its lines go under its package name all the same
logger = entry_logger(__file__)

ERROR_MARK = "qwenbuild infer error:"


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    follow_parent()
    rank = join_ranks()
    try:
        result = generate(spec["mindir_root_dir"], spec["tokenizer"], spec["prompts"], rank=rank,
                          progress=logger.info if rank == 0 else None, **spec["options"])
    except UserError as exc:
        logger.error(f"{ERROR_MARK} {exc}")
        if rank == 0:
            Path(spec["error_file"]).write_text(str(exc))
        return 2
    if rank == 0:
        Path(spec["result_file"]).write_text(json.dumps(result.to_json(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    configure()  # this process's lines in its msrun log, at the level QWENBUILD_LOG asks for
    sys.exit(main(sys.argv[1:]))
