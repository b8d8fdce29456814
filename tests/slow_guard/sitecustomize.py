"""Python imports this at start-up in every process a test starts (conftest puts this folder on PYTHONPATH): it
records slow work for the `slow` marker check (slow_work.py), then runs the sitecustomize this one hides, if any."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
try:
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
        __import__(__name__)
    except ImportError:
        sys.modules[__name__] = _self
    finally:
        sys.path[:] = _saved
except KeyboardInterrupt:
    # Ctrl-C while Python starts (the signal tests send it at any moment): end of it, as a process does before
    # Python's handler is in place, not with the site module's "Fatal Python error"
    import _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    os.kill(os.getpid(), _signal.SIGINT)
