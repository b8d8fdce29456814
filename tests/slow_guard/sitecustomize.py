"""Python imports this at start-up in every process a test starts (conftest puts this folder on PYTHONPATH): it
records slow work for the `slow` marker check (slow_work.py), then runs the sitecustomize this one hides, if any."""

import importlib
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("QWENBUILD_TEST_SLOW_RECORD"):
    sys.path.insert(0, _here)
    try:
        import slow_work

        slow_work.watch()
    finally:
        sys.path.remove(_here)

# the interpreter's own sitecustomize (Debian's, say), further down the path
_self, _saved = sys.modules[__name__], sys.path[:]
sys.path[:] = [p for p in _saved if os.path.abspath(p or ".") != _here]
try:
    del sys.modules[__name__]
    importlib.import_module(__name__)
except ImportError:
    sys.modules[__name__] = _self
finally:
    sys.path[:] = _saved
