"""Where the exported graphs of a rank live: MindFormers' names mindir_{full,inc}_checkpoint/rank_N_graph.mindir."""

from __future__ import annotations

import dataclasses
from pathlib import Path

FULL, INC = "full", "inc"
KINDS = (FULL, INC)
GRAPH_DIRS = {FULL: "mindir_full_checkpoint", INC: "mindir_inc_checkpoint"}


@dataclasses.dataclass(frozen=True)
class GraphDirs:
    """The prefill (full) and decode (inc) graph directories of an export."""

    full: Path
    inc: Path

    @classmethod
    def under(cls, root) -> "GraphDirs":
        """The two directories below an export root, as MindFormers writes them under output/."""
        return cls(Path(root) / GRAPH_DIRS[FULL], Path(root) / GRAPH_DIRS[INC])

    def dir(self, kind: str) -> Path:
        return Path(getattr(self, kind))

    def graph_file(self, kind: str, rank: int) -> Path:
        """mindir_{full,inc}_checkpoint/rank_N_graph.mindir"""
        return self.dir(kind) / f"rank_{rank}_graph.mindir"

    def variables_dir(self, kind: str, rank: int) -> Path:
        """rank_N_variables/: MindSpore's external weight files (data_0, ...), present for models over 1 GiB."""
        return self.dir(kind) / f"rank_{rank}_variables"

    def sidecar_file(self, kind: str, rank: int) -> Path:
        """rank_N_graph.json: what the graph takes and returns; written last, so it marks a complete export."""
        return self.dir(kind) / f"rank_{rank}_graph.json"


def graph_file(root, kind: str, rank: int) -> Path:
    return GraphDirs.under(root).graph_file(kind, rank)


def sidecar_file(root, kind: str, rank: int) -> Path:
    return GraphDirs.under(root).sidecar_file(kind, rank)


def variables_dir(root, kind: str, rank: int) -> Path:
    return GraphDirs.under(root).variables_dir(kind, rank)
