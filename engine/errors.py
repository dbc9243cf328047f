"""How a refusal reaches the user: one line, never a traceback. The exception for bad input, how
such a line quotes the value it refuses, the line an OSError becomes, and an argument parser whose
usage errors read the same; the engine's CLI and the TUI's `packtrain` command share them
(import-light: no torch behind any of it)."""

from __future__ import annotations

import argparse
import errno
import reprlib
from pathlib import Path
from typing import NoReturn

SHOWN_CHARS = 80  # a quoted value never makes an error line longer than this (plus the message)


class UserError(Exception):
    """Bad input or state the user can fix: the CLI prints `error: <message>` and exits non-zero.

    Raise it before anything is written, so a refused command touches nothing.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def os_error_line(e: OSError) -> str:
    """The filesystem refused (a folder that is a file, a full disk, a read-only mount, a missing
    program): the user can fix that, so it is one line rather than a traceback, naming the file in
    the way."""
    if e.errno == errno.ENAMETOOLONG:  # a name or path given where a short one belongs: quote it cut short
        return f"name too long for the filesystem: {shown(str(e.filename or ''))} (names are at most 64 characters)"
    if e.filename and e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = Path(e.filename)
        while blocker != blocker.parent and not (blocker.exists() and not blocker.is_dir()):
            blocker = blocker.parent
        if blocker != blocker.parent:
            return f"{blocker} is a file where a folder is needed"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other refusal: one `error:` line (argparse prints two)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
