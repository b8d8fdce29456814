"""`qwenbuild` and `python -m qwenbuild`: a stop signal is handled from the first line on, before the command's
modules load (they take a while), as its own handlers do once they are installed."""

import os
import signal
import sys


def _stopped_while_starting(signum, frame):
    # nothing is written yet: end as an interrupted command does, not with a traceback out of an import
    os.write(2, b"qwenbuild: interrupted; nothing half-written was kept\n")
    os._exit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_signum) is not signal.SIG_IGN:  # ignored from the start: a child, its parent decides
        signal.signal(_signum, _stopped_while_starting)

# after the handlers: a signal during this check is a start-up one too
if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    # run as a script (msrun starts lite_infer.sh's ranks so): the package's folder must not shadow top-level modules
    sys.path.pop(0)

from qwenbuild.cli import main  # noqa: E402,F401  (after the handlers: the reason for this module; the script's entry)

if __name__ == "__main__":
    sys.exit(main())
