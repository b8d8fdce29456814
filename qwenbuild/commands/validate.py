"""Check qwen.toml against schemas/qwen.schema.json and the parallel-plan rules.

Exits 0 when valid; otherwise prints every error as file:line: key: problem, and exits 2."""

from __future__ import annotations

import logging

from qwenbuild.commands import add_manifest_argument
from qwenbuild.manifest import ManifestError, load_manifest
from qwenbuild.model.params import num_parameters
from qwenbuild.plan import memory_warnings

logger = logging.getLogger(__name__)


def add_arguments(parser):
    add_manifest_argument(parser)


def main(args):
    m = load_manifest(args.config)
    if m.unavailable:
        raise ManifestError(m.unavailable)
    for w in m.warnings:
        logger.warning(f"warning: {w}")
    for w in memory_warnings(m):
        logger.warning(f"warning: {m.path}:{m.line('hardware.device_memory_gb')}: {w}")
    print(f"{m.path}: valid; {num_parameters(m.model.config) / 1e6:,.1f}M parameters, {m.hardware.device_count} "
          f"{m.hardware.device} devices")
