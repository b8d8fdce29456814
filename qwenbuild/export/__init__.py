"""Deployment artifacts: MINDIR prefill/decode graphs per rank and lite.ini."""

from qwenbuild.export.lite_ini import write_lite_ini
from qwenbuild.export.mindir import export_mindir

__all__ = ["export_mindir", "write_lite_ini"]
