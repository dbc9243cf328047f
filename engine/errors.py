"""The one exception type that reaches the user as a single line instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or state the user can fix: the CLI prints `error: <message>` and exits non-zero.

    Raise it before anything is written, so a refused command touches nothing.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
