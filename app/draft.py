"""The new-training draft: defaults for this machine, sizes for naming, and where its YAML goes.

The form saves the run's YAML to checkpoints/<name>/config.yaml: beside the run.json the engine
writes, so `packtrain-engine train --config checkpoints/<name>/config.yaml` reproduces the run
headless, and the name counts as taken from the moment it has a config.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_text
from engine.cache.naming import cache_path_for, derive_dataset_name
from engine.config import RunConfig
from engine.names import suggest_names, taken_names
from engine.paths import Layout
from engine.presets import PRESETS

UNKNOWN_VOCAB = 32_000  # a hub tokenizer's size is unknown until the engine loads it
DEVICE_PRESETS = {"cuda": "124M", "mps": "25M", "cpu": "5M"}
CPU_MAX_STEPS = 1000  # the default CPU plan finishes in minutes, not hours


def default_config(hardware: dict[str, Any] | None, base: RunConfig | None = None) -> RunConfig:
    """A valid config for this machine: a --config file's values win, else size by device."""
    if base is not None:
        return copy.deepcopy(base)
    cfg = RunConfig()
    device = (hardware or {}).get("device", "cpu")
    cfg.model.preset = DEVICE_PRESETS.get(device, "5M")
    if device == "cpu":
        cfg.train.max_steps = CPU_MAX_STEPS
    return cfg


def vocab_guess(tokenizer: str) -> int | None:
    """The vocabulary a tokenizer spec implies, or None when only loading it would tell."""
    match = re.fullmatch(r"bpe:(\d+)", tokenizer.strip())
    if match:
        return int(match.group(1))
    return 257 if tokenizer.strip() == "bytes" else None  # 256 byte values + end of text


def param_count(cfg: RunConfig) -> int:
    preset = PRESETS.get(cfg.model.preset)
    return preset.n_params(vocab_guess(cfg.data.tokenizer) or UNKNOWN_VOCAB) if preset else 0


def dataset_label(cfg: RunConfig) -> str:
    return cfg.data.dataset_name or cfg.data.source or cfg.data.cache or "data"


def name_suggestions(cfg: RunConfig, layout: Layout) -> list[str]:
    return suggest_names(param_count(cfg), dataset_label(cfg), cfg.data.seq_len, taken_names(layout))


def save_config(layout: Layout, cfg: RunConfig) -> Path:
    path = layout.config_yaml(cfg.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.dump_yaml())
    return path


def cache_location(layout: Layout, cfg: RunConfig) -> tuple[str, Path]:
    """The dataset name and folder the engine's builder will use."""
    return derive_dataset_name(cfg.data), cache_path_for(cfg.data, layout)
