"""Headless half of packtrain: cache building, data order, model, training, checkpoints, CLI.

Modules the TUI imports (protocol, catalog, paths, control, config, presets, names, errors,
atomic, usage, cache.naming) must stay import-light: no torch, transformers, datasets or
tokenizers, even lazily. Only engine/backends/ imports a training framework (README: Architecture;
tests/test_layers.py checks both).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`from engine import Trainer` (the Python API, engine.python_api), imported on first use so the
    modules the TUI imports stay light."""
    if name == "Trainer":
        from engine.python_api import Trainer

        return Trainer
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
