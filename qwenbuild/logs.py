"""Progress lines on stderr, where the user watches a long step."""

from __future__ import annotations

import sys


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
