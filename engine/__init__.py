"""Headless half of packtrain: cache building, data order, model, training, checkpoints, CLI.

Modules the TUI imports (protocol, catalog, paths, control, config, presets, names, errors,
atomic) must stay import-light: no torch, transformers, datasets or tokenizers at import time.
"""
