"""Where the exported graphs of one rank live: the original MindFormers layout under the output root."""

from __future__ import annotations

from pathlib import Path

FULL, INC = "full", "inc"
KINDS = (FULL, INC)
GRAPH_DIRS = {FULL: "mindir_full_checkpoint", INC: "mindir_inc_checkpoint"}


def graph_dir(root, kind: str) -> Path:
    return Path(root) / GRAPH_DIRS[kind]


def graph_file(root, kind: str, rank: int) -> Path:
    """out_root/mindir_{full,inc}_checkpoint/rank_N_graph.mindir"""
    return graph_dir(root, kind) / f"rank_{rank}_graph.mindir"


def variables_dir(root, kind: str, rank: int) -> Path:
    """rank_N_variables/: MindSpore's external weight files (data_0, ...), present for models over 1 GiB."""
    return graph_dir(root, kind) / f"rank_{rank}_variables"


def sidecar_file(root, kind: str, rank: int) -> Path:
    """rank_N_graph.json: what the graph takes and returns; written last, so it marks a complete export."""
    return graph_dir(root, kind) / f"rank_{rank}_graph.json"
