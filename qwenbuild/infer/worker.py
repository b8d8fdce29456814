"""One rank of a tensor-parallel generation under msrun: `python qwenbuild/infer/worker.py SPEC.json`.

Every rank runs its own graphs (their all-reduces join the ranks' slices, so every rank sees the same logits and
picks the same tokens); rank 0 reports progress and writes the result to SPEC's result_file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # msrun runs this file as a script: its folder must not shadow top-level modules
    sys.path.pop(0)

from qwenbuild.errors import UserError  # noqa: E402
from qwenbuild.infer.runtime import generate, join_ranks, print_progress  # noqa: E402
from qwenbuild.processes import follow_parent  # noqa: E402

ERROR_MARK = "qwenbuild infer error:"


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    follow_parent()
    rank = join_ranks()
    try:
        result = generate(spec["mindir_root_dir"], spec["tokenizer"], spec["prompts"], rank=rank,
                          progress=print_progress if rank == 0 else None, **spec["options"])
    except UserError as exc:
        print(f"{ERROR_MARK} {exc}", file=sys.stderr, flush=True)
        if rank == 0:
            Path(spec["error_file"]).write_text(str(exc))
        return 2
    if rank == 0:
        Path(spec["result_file"]).write_text(json.dumps(result.to_json(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
