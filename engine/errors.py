"""The one exception type that reaches the user as a single line instead of a traceback, and how
such a line quotes the value it refuses."""

from __future__ import annotations

import reprlib

SHOWN_CHARS = 80  # a quoted value never makes an error line longer than this (plus the message)


class UserError(Exception):
    """Bad input or state the user can fix: the CLI prints `error: <message>` and exits non-zero.

    Raise it before anything is written, so a refused command touches nothing.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Short(reprlib.Repr):
    """repr() that looks at a bounded part of a value: a YAML alias bomb (`[*a, *a, ...]` nested
    ten deep) shares its lists, so a full repr walks billions of items; this one walks a dozen."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 4
        self.maxstring = self.maxother = 60
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a 5,000-digit int raises; the size is what matters
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


_SHORT = _Short()


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error message quotes it: a repr cut to `limit` characters, whatever its size or shape."""
    text = repr(value[:limit]) if isinstance(value, str) else _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
