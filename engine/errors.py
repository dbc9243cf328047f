"""How a refusal reaches the user: one line, never a traceback. The exception for bad input, the
line an OSError becomes, and an argument parser whose usage errors read the same; the engine's CLI
and the TUI's `packtrain` command share them (import-light: no torch behind any of it)."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import NoReturn


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
