"""Deployment artifacts: MINDIR prefill/decode graphs per rank, their normalised digests, and lite.ini."""

from qwenbuild.export.digest import mindir_digest
from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.mindir import export_mindir

__all__ = ["export_mindir", "mindir_digest", "write_lite_ini"]
