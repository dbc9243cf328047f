"""Run configuration: model, data and training dataclasses, YAML/JSON I/O, validation and CLI flags.

One schema serves the CLI (every field is a flag named after it), YAML files, the TUI's form and
checkpoints/<name>/run.json, so a saved run.json reproduces the run. Import-light for the TUI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from engine.errors import UserError
from engine.paths import check_name
from engine.presets import PRESETS

SCHEDULES = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "torch", "mlx")  # auto: mlx on Apple Silicon when mlx-lm is installed, else torch
MAX_SEQ_LEN = 1 << 20


@dataclass
class ModelConfig:
    preset: str = "5M"
    model_config: str | None = None  # path to a LlamaConfig JSON; overrides the preset's shape


@dataclass
class DataConfig:
    source: str | None = "stdlib"  # 'stdlib', a local file/folder/glob, or a hub dataset name
    dataset_name: str | None = None  # cache folder name; derived from the source when empty
    subset: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    tokenizer: str = "bpe:8192"  # 'bpe:<vocab>', 'bytes', a hub name, a folder or a tokenizer.json
    seq_len: int = 256
    docs_per_chunk: int | None = None
    max_docs: int | None = None
    max_chunks: int | None = None
    cache: str | None = None  # explicit cache folder; else cache/packed_sequences/<seq_len>/<dataset_name>
    eval_chunks: int = 1  # held-out chunks at the end of the cache, never trained on


@dataclass
class TrainConfig:
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None
    wsd_decay_ratio: float = 0.2
    epochs: float = 1.0
    epoch_fraction: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    estimated_total_sequences: int | None = None  # smart warmup: plan warmup on the full dataset
    precision: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 1
    save_interval: int = 100
    keep_last: int = 3
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    growth_check_interval: int = 0  # re-check the cache for new chunks every K steps; 0 = at resume only
    shuffle_buffer_mb: int = 1024  # decoded rows shuffled together (and kept decoded): all of a cache that fits


@dataclass
class RunConfig:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # --- I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise UserError("config must be a mapping with 'name', 'model', 'data' and 'train' sections")
        data = dict(data.get("config", data))  # run.json wraps the config with its runs history
        cfg = cls(name=str(data.pop("name", "") or ""))
        for section in ("model", "data", "train"):
            values = data.pop(section, None) or {}
            if not isinstance(values, dict):
                raise UserError(f"config section '{section}' must be a mapping")
            setattr(cfg, section, _build(type(getattr(cfg, section)), values, section))
        if data:
            raise UserError(f"unknown config key(s): {', '.join(sorted(data))}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read config {p}: {e.strerror or e}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"config {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}") from None
        return cls.from_dict(data or {})

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Identity of what the run computes (name excluded, so a copy under a new name matches)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        if self.name:
            check_name(self.name, "model name")
        m, d, t = self.model, self.data, self.train
        if m.model_config is None and m.preset not in PRESETS:
            raise UserError(f"unknown preset {m.preset!r}; choose one of {', '.join(PRESETS)}")
        if m.model_config is not None and not Path(m.model_config).is_file():
            raise UserError(f"model config {m.model_config!r} does not exist")
        if d.source is None and d.cache is None and d.dataset_name is None:
            raise UserError("data: give a source, a dataset_name or a cache path")
        if d.dataset_name is not None:
            check_name(d.dataset_name, "dataset name")
        _require(d.seq_len >= 2, f"data.seq_len must be at least 2, got {d.seq_len}")
        _require(d.seq_len <= MAX_SEQ_LEN, f"data.seq_len {d.seq_len} is unreasonably large (at most {MAX_SEQ_LEN:,})")
        for key in ("docs_per_chunk", "max_docs", "max_chunks"):
            v = getattr(d, key)
            _require(v is None or v >= 1, f"data.{key} must be positive, got {v}")
        _require(d.eval_chunks >= 0, f"data.eval_chunks must be >= 0, got {d.eval_chunks}")
        for key in ("micro_batch", "grad_accum", "save_interval", "log_interval", "eval_interval", "eval_batches"):
            v = getattr(t, key)
            _require(v >= 1, f"train.{key} must be a positive integer, got {v}")
        _require(t.keep_last >= 2, f"train.keep_last must be at least 2, got {t.keep_last}")
        for key in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "warmup_ratio",
                    "wsd_decay_ratio", "epochs", "epoch_fraction"):
            _require(math.isfinite(getattr(t, key)), f"train.{key} must be a finite number, got {getattr(t, key)}")
        _require(t.lr > 0, f"train.lr must be a positive number, got {t.lr}")
        _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
        _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
        _require(t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
        _require(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        _require(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(0 < t.wsd_decay_ratio <= 1, f"train.wsd_decay_ratio must be in (0, 1], got {t.wsd_decay_ratio}")
        _require(t.epochs > 0, f"train.epochs must be positive, got {t.epochs}")
        _require(0 < t.epoch_fraction <= 1, f"train.epoch_fraction must be in (0, 1], got {t.epoch_fraction}")
        _require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be positive, got {t.max_steps}")
        _require(t.max_tokens is None or t.max_tokens >= 1, f"train.max_tokens must be positive, got {t.max_tokens}")
        _require(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        _require(t.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}, got {t.device!r}")
        _require(t.backend in BACKENDS, f"train.backend must be one of {', '.join(BACKENDS)}, got {t.backend!r}")
        _require(t.growth_check_interval >= 0, "train.growth_check_interval must be >= 0")
        _require(t.shuffle_buffer_mb >= 1, f"train.shuffle_buffer_mb must be a positive integer, got {t.shuffle_buffer_mb}")
        return self


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _field_type(cls: type, name: str) -> type:
    hint = get_type_hints(cls)[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if get_origin(hint) is not None and args else hint


def _coerce(value: Any, typ: type, where: str) -> Any:
    """A YAML/JSON/flag value as the field's type. Lists and mappings are never silently turned into
    strings, nor booleans into numbers (`micro_batch: true` is a mistake, not 1)."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, dict)) or (isinstance(value, bool) and typ is not bool):
            raise ValueError(value)
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in {"1", "true", "yes", "on"}:
                    return True
                if low in {"0", "false", "no", "off"}:
                    return False
            elif value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                value = value.replace("_", "").replace(",", "")
                return int(float(value)) if "e" in value.lower() else int(value)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown key(s) in '{section}': {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, _field_type(cls, k), f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


# --- CLI flags mirror the field names -------------------------------------------------------------

SECTIONS = ("model", "data", "train")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (`--max-steps`, `--micro-batch`, ...), default unset."""
    parser.add_argument("--name", dest="cfg__name", default=None, help="model name (checkpoints/<name>/)")
    for section, cls in zip(SECTIONS, (ModelConfig, DataConfig, TrainConfig)):
        group = parser.add_argument_group(f"{section} config")
        for f in fields(cls):
            typ = _field_type(cls, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f"default: {default}"
            if typ is bool:
                group.add_argument(flag_name(f.name), dest=f"cfg_{section}_{f.name}", default=None,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag_name(f.name), dest=f"cfg_{section}_{f.name}", default=None,
                                   metavar=typ.__name__.upper(), help=help_text)


def apply_config_flags(cfg: RunConfig, ns: argparse.Namespace) -> RunConfig:
    """Overlay the flags the user actually gave onto `cfg` (a file's values or the defaults)."""
    if getattr(ns, "cfg__name", None):
        cfg.name = ns.cfg__name
    for section in SECTIONS:
        part = getattr(cfg, section)
        for f in fields(part):
            value = getattr(ns, f"cfg_{section}_{f.name}", None)
            if value is not None:
                if isinstance(value, str) and value.lower() in {"none", "null"}:
                    setattr(part, f.name, None)
                else:
                    setattr(part, f.name, _coerce(value, _field_type(type(part), f.name), f"{section}.{f.name}"))
    return cfg
