"""The argument parser of both commands (packtrain, packtrain-engine), apart from the engine's CLI so the
TUI's launcher reaches no engine command modules."""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other refusal: one `error:` line (argparse prints two)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
