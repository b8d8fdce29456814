"""The one exception type users see: a message that says what is wrong and what to do."""


class UserError(Exception):
    """Bad input or an impossible request; the CLI prints the message and exits non-zero, with no traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


def os_error_text(exc: OSError) -> str:
    """An OSError as one line naming its path(s): `path -> path2: reason`."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {what}" if paths else what
