"""The one exception type users see: a message that says what is wrong and what to do."""


class UserError(Exception):
    """Bad input or an impossible request; the CLI prints the message and exits non-zero, with no traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")
