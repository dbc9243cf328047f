"""Run configuration: model, data and training dataclasses, YAML/JSON I/O, validation and CLI flags.

One schema serves the CLI (every field is a flag named after it), YAML files, the TUI's form and
checkpoints/<name>/run.json, so a saved run.json reproduces the run. Import-light for the TUI.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from engine.errors import UserError, shown
from engine.llama_json import check_fits, read_llama_json
from engine.paths import check_name
from engine.presets import PRESETS
from engine.user_files import MAX_PATH, read_user_text

SCHEDULES = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
METHODS = ("full", "lora", "qlora")  # what trains of a pretrained model: all of it, or a LoRA adapter
QUANT_BITS = (4, 8)  # qlora's base, through bitsandbytes on CUDA
# The peak LR when train.lr is left unset: a model from scratch takes big steps; a pretrained one is
# adapted, and a full fine-tune at a scratch LR forgets what it knew; an adapter starts at zero and
# moves only its low-rank delta, so it takes a LoRA paper's LR.
DEFAULT_LR = {"scratch": 1e-3, "full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
PARALLELS = ("ddp", "fsdp")  # under torchrun: every rank holds the whole model, or a shard of it (FSDP2)
BACKENDS = ("auto", "torch", "mlx")  # auto: mlx on Apple Silicon when mlx-lm is installed, else torch
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": None}  # sink -> the package (and extra) it needs
SECTIONS = ("model", "data", "train")
MAX_SEQ_LEN = 1 << 20
MAX_COUNT = 10**15  # steps, tokens, documents, intervals: beyond any real run, and exact as a float
MAX_BATCH = 1 << 20  # sequences per micro-batch, or micro-batches per step
INT_LIMITS = {"seq_len": MAX_SEQ_LEN, "micro_batch": MAX_BATCH, "grad_accum": MAX_BATCH}  # else MAX_COUNT
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed accepts
MAX_DIGITS = 100  # '1e400' as an integer is refused before it is expanded


@dataclass
class ModelConfig:
    preset: str = "5M"
    model_config: str | None = None  # path to a LlamaConfig JSON; overrides the preset's shape
    init_from: str | None = None  # a pretrained HF folder or hub name to fine-tune; presets then do not apply
    method: str = "full"  # full, lora or qlora (with init_from)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str | None = None  # comma-separated module names; default per architecture
    quant_bits: int = 4  # qlora's base: 4 or 8 bits

    @property
    def adapter(self) -> bool:
        """Only a LoRA adapter trains; checkpoints hold it alone, plus the base's identity."""
        return self.init_from is not None and self.method != "full"


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
    lr: float = 1e-3  # a new fine-tune that does not set it gets DEFAULT_LR for its method (with_default_lr)
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
    parallel: str = "ddp"  # how torchrun's processes split the model: ddp or fsdp (engine.backends.torch_fsdp)
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 1
    save_interval: int = 100
    keep_last: int = 3
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    early_stop_patience: int = 0  # stop after N evals without a new best eval loss; 0 = never
    growth_check_interval: int = 0  # re-check the cache for new chunks every K steps; 0 = at resume only
    shuffle_buffer_mb: int = 1024  # decoded rows shuffled together (and kept decoded): all of a cache that fits
    sample_every: int = 0  # generate a short sample every N steps, as a `sample` event; 0 = off
    sample_prompt: str | None = None  # what samples continue; none starts a new document
    sample_tokens: int | None = None  # new tokens per sample; none: min(48, seq_len / 2)
    sample_temperature: float = 0.8  # 0 is greedy; sampled with `seed`, so every sample draws the same numbers
    tracker: str | None = None  # extra metric sinks, comma-separated: tensorboard, wandb, csv (engine.tracking)
    divergence_patience: int = 3  # non-finite steps in a row before a rollback (engine.guard); 0: no guard
    divergence_lr_factor: float = 0.5  # the LR multiplier each rollback applies


SECTION_TYPES: dict[str, type] = dict(zip(SECTIONS, (ModelConfig, DataConfig, TrainConfig)))


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
        data = _unwrap(data)
        cfg = cls(name=_coerce(data.pop("name", None), str, "name") or "")
        for section in SECTIONS:
            if section not in data:
                continue
            values = data.pop(section)
            if not isinstance(values, dict):
                raise UserError(f"config section '{section}' must be a mapping of its keys, got {shown(values)}")
            setattr(cfg, section, _build(type(getattr(cfg, section)), values, section))
        if data:
            raise UserError(f"unknown config key(s): {_key_list(data)}")
        return cfg

    @staticmethod
    def read(path: str | Path) -> dict[str, Any]:
        """A config file's mapping as written (run.json's included), before any value is converted."""
        p = Path(path)
        text = read_user_text(p, "config")
        kind = "JSON" if p.suffix == ".json" else "YAML"
        try:
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"config {p} is not valid {kind}: {shown(first)}") from None
        except RecursionError:
            raise UserError(f"config {p} is nested too deeply to be a run config") from None
        if data is None:
            raise UserError(f"config {p} is empty")
        _unwrap(data)  # refuse a list or a scalar here, where the file is named
        return data

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(cls.read(path))

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Identity of what the run computes (name excluded, so a copy under a new name matches)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Every refusal a config can earn without looking at a cache: before any cache work, any
        write and the torch import. Values set in code get the same type checks as parsed ones."""
        _require(isinstance(self.name, str), f"name: expected str, got {shown(self.name)}")
        if self.name:
            check_name(self.name, "model name")
        _check_fields(self.model, "model.")
        _check_fields(self.train, "train.")
        m, d, t = self.model, self.data, self.train
        check_model(m, d)
        if m.model_config is None and m.preset not in PRESETS:
            raise UserError(f"unknown preset {shown(m.preset)}; choose one of {', '.join(PRESETS)}")
        if d.source is None and d.cache is None and d.dataset_name is None:
            raise UserError("data: give a source, a dataset_name or a cache path")
        check_data(d)
        if m.model_config is not None:
            check_fits(read_llama_json(m.model_config), d.seq_len, f"model config {m.model_config}")
        for key in ("micro_batch", "grad_accum", "save_interval", "log_interval", "eval_interval", "eval_batches"):
            v = getattr(t, key)
            _require(v >= 1, f"train.{key} must be a positive integer, got {v}")
        _require(t.keep_last >= 2, f"train.keep_last must be at least 2, got {t.keep_last}")
        _require(t.lr > 0, f"train.lr must be a positive number, got {t.lr}")
        _require(t.early_stop_patience >= 0, "train.early_stop_patience must be >= 0 (0: never stop early)")
        _require(t.early_stop_patience == 0 or d.eval_chunks > 0,
                 "train.early_stop_patience needs eval data: set data.eval_chunks to 1 or more")
        _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
        _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
        _require(t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {shown(t.schedule)}")
        _require(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        _require(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(0 < t.wsd_decay_ratio <= 1, f"train.wsd_decay_ratio must be in (0, 1], got {t.wsd_decay_ratio}")
        _require(t.epochs > 0, f"train.epochs must be positive, got {t.epochs}")
        _require(0 < t.epoch_fraction <= 1, f"train.epoch_fraction must be in (0, 1], got {t.epoch_fraction}")
        for key in ("max_steps", "max_tokens", "estimated_total_sequences"):
            v = getattr(t, key)
            _require(v is None or v >= 1, f"train.{key} must be positive, got {v}")
        _require(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {shown(t.precision)}")
        _require(t.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}, got {shown(t.device)}")
        _require(t.backend in BACKENDS, f"train.backend must be one of {', '.join(BACKENDS)}, got {shown(t.backend)}")
        check_parallel(m, t)
        _require(t.growth_check_interval >= 0, "train.growth_check_interval must be >= 0")
        _require(t.sample_every >= 0, f"train.sample_every must be >= 0 (0 disables), got {t.sample_every}")
        _require(t.sample_tokens is None or t.sample_tokens >= 1,
                 f"train.sample_tokens must be a positive integer, got {t.sample_tokens}")
        _require(t.sample_every == 0 or t.sample_tokens is None or t.sample_tokens < d.seq_len or d.cache is not None,
                 f"train.sample_tokens ({t.sample_tokens}) must leave room for a prompt in seq_len {d.seq_len}")
        _require(t.sample_temperature >= 0, f"train.sample_temperature must be >= 0 (0 is greedy), "
                                            f"got {t.sample_temperature}")
        tracker_names(t.tracker)
        _require(t.divergence_patience >= 0, "train.divergence_patience must be >= 0 (0 turns the guard off)")
        _require(0 < t.divergence_lr_factor <= 1,
                 f"train.divergence_lr_factor must be in (0, 1], got {t.divergence_lr_factor}")
        _require(t.shuffle_buffer_mb >= 1, f"train.shuffle_buffer_mb must be a positive integer, got {t.shuffle_buffer_mb}")
        low, high = SEED_RANGE
        _require(low <= t.seed <= high, f"train.seed must be between -2**63 and 2**64-1 (what torch accepts), "
                                        f"got {_number(t.seed)}")
        return self


def default_lr(m: ModelConfig) -> float:
    return DEFAULT_LR[m.method if m.init_from else "scratch"]


def with_default_lr(cfg: RunConfig, given: set[str]) -> RunConfig:
    """A new run whose LR nobody gave (`given`: given_fields) trains at its start's default, so a
    fine-tune never starts at the from-scratch LR that would wreck what the model knows."""
    if "train.lr" not in given:
        cfg.train.lr = default_lr(cfg.model)
    return cfg


def check_model(m: ModelConfig, d: DataConfig) -> None:
    """What fine-tuning settings can be refused from the config alone; a local model folder is read
    here too (its config.json, for the context length), a hub name only when the run starts."""
    _require(m.method in METHODS, f"model.method must be one of {', '.join(METHODS)}, got {shown(m.method)}")
    _require(m.lora_rank >= 1, f"model.lora_rank must be a positive integer, got {m.lora_rank}")
    _require(m.lora_alpha > 0, f"model.lora_alpha must be positive, got {m.lora_alpha}")
    _require(0 <= m.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}")
    _require(m.quant_bits in QUANT_BITS, f"model.quant_bits must be 4 or 8, got {m.quant_bits}")
    if m.init_from is None:
        _require(m.method == "full", f"model.method {m.method} adapts a pretrained model: give --init-from "
                                     "a model folder or hub name")
        return
    _require(m.model_config is None, "model.model_config does not apply with init_from: the pretrained model's "
                                     "own config.json sets its shape (and model.preset is ignored)")
    _require(d.tokenizer in (DataConfig.tokenizer, m.init_from), "data.tokenizer does not apply with init_from: the "
             f"model's own tokenizer builds the cache (got {shown(d.tokenizer)})")
    from engine.pretrained import check_local_model

    check_local_model(m.init_from, d.seq_len)


def check_parallel(m: ModelConfig, t: TrainConfig) -> None:
    """What sharding cannot do, from the config alone; the process count is the backend's to check."""
    _require(t.parallel in PARALLELS, f"train.parallel must be one of {', '.join(PARALLELS)}, got {shown(t.parallel)}")
    if t.parallel != "fsdp":
        return
    _require(not m.adapter, f"train.parallel fsdp shards a full fine-tune or a model from scratch; a {m.method} "
                            "adapter is small: train it with --parallel ddp")
    _require(t.sample_every == 0, "train.sample_every does not work with train.parallel fsdp: rank 0 samples alone, "
                                  "and a sharded model needs every rank; leave --sample-every out")


def check_data(d: DataConfig, where: str = "data.") -> None:
    """The data section alone: all `cache build` needs checked before it touches anything."""
    _check_fields(d, where)
    if d.dataset_name is not None:
        check_name(d.dataset_name, "dataset name")
    _require(d.seq_len >= 2, f"{where}seq_len must be at least 2, got {d.seq_len}")
    for key in ("docs_per_chunk", "max_docs", "max_chunks"):
        v = getattr(d, key)
        _require(v is None or v >= 1, f"{where}{key} must be positive, got {v}")
    _require(d.max_docs is None or d.max_chunks is None, "give max_docs or max_chunks, not both")
    _require(d.eval_chunks >= 0, f"{where}eval_chunks must be >= 0, got {d.eval_chunks}")


def tracker_names(spec: str | None) -> list[str]:
    """The sinks `train.tracker` names (`tensorboard,csv`), each once. One whose package is missing
    is refused here, with the extra that installs it, before the run writes anything."""
    names = [] if spec is None else [part.strip().lower() for part in spec.split(",")]
    for name in names:
        _require(name in TRACKERS, f"train.tracker: unknown tracker {shown(name)}; choose from {', '.join(TRACKERS)}")
        package = TRACKERS[name]
        _require(package is None or importlib.util.find_spec(package) is not None,
                 f"--tracker {name} needs the {package} package: pip install 'packtrain[{name}]'")
    return list(dict.fromkeys(names))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_fields(part: Any, where: str) -> None:
    """Each field holds its declared type (None only where it is optional), integers stay within
    what a run can mean, floats are finite and strings are neither empty nor longer than a path."""
    for f in fields(part):
        typ, optional = _field_kind(type(part), f.name)
        value, name = getattr(part, f.name), f"{where}{f.name}"
        if value is None:
            _require(optional, f"{name} is required, got none")
        elif typ is bool:
            _require(isinstance(value, bool), f"{name}: expected true or false, got {shown(value)}")
        elif typ is int:
            _require(isinstance(value, int) and not isinstance(value, bool), f"{name}: expected int, got {shown(value)}")
            if f.name != "seed":  # the seed has its own range, checked in validate()
                limit = INT_LIMITS.get(f.name, MAX_COUNT)
                _require(value <= limit, f"{name} {_number(value)} is unreasonably large (at most {limit:,})")
                _require(value >= -limit, f"{name} {_number(value)} is out of range")
        elif typ is float:
            _require(isinstance(value, (int, float)) and not isinstance(value, bool),
                     f"{name}: expected float, got {shown(value)}")
            _require(_finite(value), f"{name} must be a finite number, got {_number(value)}")
        else:
            _require(isinstance(value, str), f"{name}: expected str, got {shown(value)}")
            _require(value.strip() != "", f"{name} is empty; leave it out for the default")
            _require(len(value) <= MAX_PATH, f"{name} is {len(value):,} characters long (at most {MAX_PATH:,})")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _number(value: int | float) -> str:
    """A number for a message: digits grouped while that stays readable, else shown()'s summary."""
    return f"{value:,}" if isinstance(value, int) and abs(value) < 10**30 else shown(value)


@functools.cache  # get_type_hints evaluates every annotation string of the class on each call
def _field_kind(cls: type, name: str) -> tuple[type, bool]:
    """(the field's type, whether None is allowed): `int | None` -> (int, True)."""
    hint = get_type_hints(cls)[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is not None and args:
        return args[0], len(args) < len(get_args(hint))
    return hint, False


def _coerce(value: Any, typ: type, where: str) -> Any:
    """A YAML/JSON/flag value as the field's type. Only scalars are converted: a list or a mapping is
    refused unseen (str() of an aliased YAML structure can take minutes and megabytes), and so is a
    boolean where a number belongs (`micro_batch: true` is a mistake, not 1)."""
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or (isinstance(value, bool) and typ is not bool):
        raise UserError(f"{where}: expected {typ.__name__}, got {shown(value)}")
    try:
        if typ is bool:
            return _to_bool(value)
        if typ is int:
            return _to_int(value)
        if typ is float:
            return float(value)
        return value if isinstance(value, str) else str(value)  # `subset: 2024` is text
    except OverflowError:
        raise UserError(f"{where}: {shown(value)} is out of range") from None
    except (TypeError, ValueError, ArithmeticError):
        raise UserError(f"{where}: expected {typ.__name__}, got {shown(value)}") from None


def _to_bool(value: str | int | float) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
    elif value in (0, 1):
        return bool(value)
    raise ValueError(value)


def _to_int(value: str | int | float) -> int:
    """'1_000', '8,192', '1e6' and 8.0 are integers; 1.5, 'nan' and '1e400' are not (the last is
    refused as out of range before 400 digits are ever expanded)."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, int):
        return value
    text = value.strip().replace(",", "")
    number = Decimal(text)  # InvalidOperation (an ArithmeticError) for words
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError(value)
    if number.adjusted() > MAX_DIGITS:
        raise OverflowError(value)
    return int(number)


def _unwrap(data: Any) -> dict[str, Any]:
    """The config mapping itself (a copy): run.json wraps it with its runs history."""
    if not isinstance(data, dict):
        raise UserError(f"config must be a mapping with 'name', 'model', 'data' and 'train' sections, got {shown(data)}")
    inner = data.get("config", data)
    if not isinstance(inner, dict):
        raise UserError(f"run.json 'config' must be a mapping, got {shown(inner)}")
    return dict(inner)


def _key_list(keys: Any) -> str:
    """Unknown keys for a message: few, short, and sortable whatever YAML made of them."""
    names = sorted(k if isinstance(k, str) and len(k) <= 40 else shown(k) for k in keys)
    return ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"unknown key(s) in '{section}': {_key_list(unknown)}")
    kwargs = {k: _coerce(v, _field_kind(cls, k)[0], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


# --- CLI flags mirror the field names -------------------------------------------------------------


FLAG_HELP = {
    "lr": "peak LR; default: " + ", ".join(f"{v:g} {k}" for k, v in DEFAULT_LR.items()),
    "init_from": "fine-tune this pretrained model (a folder or hub name); its own config and tokenizer apply",
    "method": f"with --init-from: {', '.join(METHODS)} (qlora: a 4/8-bit base, CUDA only); default: full",
    "lora_targets": "comma-separated module names; default: every attention and MLP projection",
    "parallel": f"under torchrun: {' or '.join(PARALLELS)} (fsdp shards weights, grads and AdamW state); default: ddp",
    "early_stop_patience": "stop after N evals without a lower eval loss; default: 0 (never)",
}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (`--max-steps`, `--micro-batch`, ...), default unset."""
    parser.add_argument("--name", dest="cfg__name", default=None, help="model name (checkpoints/<name>/)")
    for section, cls in SECTION_TYPES.items():
        group = parser.add_argument_group(f"{section} config")
        for f in fields(cls):
            typ = _field_kind(cls, f.name)[0]
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            help_text = FLAG_HELP.get(f.name, f"default: {default}")
            if typ is bool:
                group.add_argument(flag_name(f.name), dest=f"cfg_{section}_{f.name}", default=None,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag_name(f.name), dest=f"cfg_{section}_{f.name}", default=None,
                                   metavar=typ.__name__.upper(), help=help_text)


def apply_config_flags(cfg: RunConfig, ns: argparse.Namespace) -> RunConfig:
    """Overlay the flags the user actually gave onto `cfg` (a file's values or the defaults)."""
    if getattr(ns, "cfg__name", None) is not None:
        cfg.name = check_name(ns.cfg__name, "model name")
    for section in SECTIONS:
        part = getattr(cfg, section)
        for f in fields(part):
            value = getattr(ns, f"cfg_{section}_{f.name}", None)
            if value is not None:
                if isinstance(value, str) and value.lower() in {"none", "null"}:
                    setattr(part, f.name, None)
                else:
                    setattr(part, f.name, _coerce(value, _field_kind(type(part), f.name)[0], f"{section}.{f.name}"))
    return cfg


def given_fields(raw: dict[str, Any], ns: argparse.Namespace | None = None) -> set[str]:
    """'section.key' for every field the user set, in the config file (`raw`, as RunConfig.read
    returns it) or as a flag: the values a command may not silently replace."""
    data = _unwrap(raw) if raw else {}
    given = {f"{section}.{key}" for section in SECTIONS for key in (data.get(section) or {})}
    for section, cls in SECTION_TYPES.items():
        given |= {f"{section}.{f.name}" for f in fields(cls) if getattr(ns, f"cfg_{section}_{f.name}", None) is not None}
    return given
