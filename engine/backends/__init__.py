"""Which framework trains, and why: `auto` is mlx on Apple Silicon when mlx-lm is installed, else torch.

Implementations are imported by module name when a run starts (`load`), never at import time, so
the framework-free layer that chooses one imports neither torch nor mlx.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from dataclasses import dataclass

from engine.config import BACKENDS
from engine.errors import UserError

MODULES = {"torch": "engine.backends.torch_backend", "mlx": "engine.backends.mlx_backend"}


@dataclass(frozen=True)
class Choice:
    name: str  # torch or mlx
    reason: str  # one line for `info`, the Environment screen and the run log


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def has_mlx_lm() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def choose(choice: str) -> Choice:
    """The backend a run with train.backend = `choice` uses on this machine."""
    if choice not in BACKENDS:
        raise UserError(f"train.backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch":
        return Choice("torch", "chosen with --backend torch")
    if choice == "mlx":
        if not has_mlx_lm():
            raise UserError("train.backend is mlx but mlx-lm is not installed; pip install -e '.[mlx]'")
        return Choice("mlx", "chosen with --backend mlx")
    if not apple_silicon():
        return Choice("torch", f"auto: not Apple Silicon, this is {platform.system()} {platform.machine()}")
    if not has_mlx_lm():
        return Choice("torch", "auto: Apple Silicon, but mlx-lm is not installed (pip install -e '.[mlx]')")
    return Choice("mlx", "auto: Apple Silicon with mlx-lm installed")


def load(name: str) -> type:
    """The Backend class of `name` (importing its framework now)."""
    return importlib.import_module(MODULES[name]).BACKEND
