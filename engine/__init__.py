"""Headless half of packtrain: cache building, data order, model, training, checkpoints, CLI.

Modules the TUI imports (protocol, catalog, paths, control, config, presets, names, errors,
atomic, usage, cache.naming) must stay import-light: no torch, transformers, datasets or
tokenizers, even lazily. Only engine/backends/ imports a training framework (README: Architecture;
tests/test_layers.py checks both).
"""
