"""trainer_state.json and run.json as typed, versioned records, checked whole when read.

A resume continues from every number these files hold, so a bad one must be refused before the
resume writes anything (run.json, a run log, a lock), in one line that names the file and the
field, not as a TypeError three calls later or after the run has started. The Trainer writes
through the same dataclasses, so what is written is what is read back.

The check is the field types below, read by `decode`: exact JSON types (a bool is not a number, a
float is not an int), required keys, no unknown keys, bounds where a wrong sign would break the
loop. Two parts belong to their owners and are only required to be objects here: the `data`
mapping and the growth events (engine.data.DataOrder.restore checks them) and the run config
(engine.config.RunConfig). Framework-free (no torch, no numpy): the catalog reads states with it.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from engine.atomic import read_json
from engine.errors import UserError
from engine.schedule import Schedule

TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_FORMAT = "packtrain.trainer_state/1"
RUN_FORMAT = "packtrain.run/1"
SHOWN_CHARS = 60  # of a bad value in an error line: a huge or nested value never floods the terminal
EXACT = (int, str, bool)  # element types whose lists are checked in one pass

R = TypeVar("R")


@dataclass(frozen=True)
class Min:
    """Lower bound of an Annotated number field."""

    value: float


@dataclass(frozen=True)
class Unbounded:
    """Marks a float field that may be NaN or infinite (a diverged loss is still a record of one)."""


@dataclass(frozen=True)
class NoNul:
    """Marks a string that becomes a path: a NUL byte there is an error from the OS, not a path."""


Count = Annotated[int, Min(0)]
Positive = Annotated[int, Min(1)]
Seconds = Annotated[float, Min(0)]
Loss = Annotated[float, Unbounded()]


class ShapeError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"field {where!r} {message}" if where else message)


# --- the records ------------------------------------------------------------------------------------


@dataclass
class CacheRecord:
    """The cache a checkpoint trained on, to refuse resuming onto different data."""

    dataset_name: str
    path: Annotated[str, NoNul()]
    total_sequences: Count
    sequence_length: Positive
    generation: Count
    manifest_hash: str
    tokenizer_sha256: str
    consumed_manifest_hash: str
    dtype: str
    vocab_size: Positive


@dataclass
class PlanRecord:
    schedule: Schedule
    global_batch: Positive
    n_sequences: Count

    def problem(self) -> tuple[str, str] | None:
        """Schedule numbers that would divide by zero or send the LR negative."""
        s = self.schedule
        checks = (
            ("warmup_steps", s.warmup_steps >= 0, "must be >= 0"),
            ("total_steps", s.total_steps >= 1, "must be >= 1"),
            ("peak_lr", s.peak_lr > 0, "must be positive"),
            ("min_lr", 0 <= s.min_lr <= s.peak_lr, "must be in [0, peak_lr]"),
            ("wsd_decay_ratio", 0 < s.wsd_decay_ratio <= 1, "must be in (0, 1]"),
            ("anchors", all(a >= 0 and 0 <= p <= 1 for a, p in s.anchors), "must be [step >= 0, progress in [0, 1]] pairs"),
        )
        return next(((f"schedule.{key}", message) for key, ok, message in checks if not ok), None)


@dataclass
class RngState:
    """Every RNG the run draws from, as JSON lists; the backend checks their contents. numpy's and
    Python's always; the generators of the backend that saved it (torch and cuda, or mlx's key), the
    other backend's left empty."""

    numpy: tuple[str, list[int], int, int, float]
    random: tuple[int, list[int], float | None]
    torch: list[int] = field(default_factory=list)
    cuda: list[list[int]] = field(default_factory=list)
    mlx: list[int] = field(default_factory=list)


@dataclass
class ScalerState:
    """torch.amp.GradScaler.state_dict(), saved only for fp16 runs."""

    scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: Positive
    _growth_tracker: Count


@dataclass
class GuardRecord:
    """What the divergence guard (engine.guard) did so far; a resume carries on with its LR scale.
    (The OOM ladder's changes are config: run.json holds the micro-batch the run trains with.)"""

    lr_scale: Annotated[float, Min(0)] = 1.0  # product of the rollbacks' LR factors
    skipped_steps: Count = 0  # updates skipped for a non-finite loss or grad norm
    rollbacks: Count = 0


@dataclass
class OptimizerState:
    """Param groups (hyperparameters and parameter names) and non-tensor per-parameter state; the
    tensors are in optimizer.safetensors. Values are compared with the live optimizer on load."""

    param_groups: list[dict[str, Any]]
    scalars: dict[str, dict[str, Any]] = field(default_factory=dict)

    def problem(self) -> tuple[str, str] | None:
        for i, group in enumerate(self.param_groups):
            params = group.get("params")
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                return f"param_groups[{i}].params", "must be a list of parameter names"
            for key, value in group.items():
                if key != "params" and not _plain(value):
                    return f"param_groups[{i}].{key}", f"must be a number, bool, string or null, got {_shown(value)}"
        for name, entry in self.scalars.items():
            for key, value in entry.items():
                if not is_number(value):
                    return f"scalars.{name}.{key}", f"must be a number, got {_shown(value)}"
        return None


@dataclass
class TrainerState:
    """trainer_state.json: where a run stands at an optimizer-step boundary."""

    format: Literal[TRAINER_STATE_FORMAT]
    model_name: str
    display_name: str
    step: Count
    run: Positive
    tokens_seen: Count
    loss: Loss | None
    eval_loss: Loss | None
    best_eval_loss: Loss | None
    saved_at: float
    elapsed_s: Seconds
    epoch: Count
    cursor: Count
    growth_events: list[dict[str, Any]]  # engine.data.GrowthEvent records, checked by DataOrder.restore
    data: dict[str, Any]  # engine.data.DataOrder.state(), checked by DataOrder.restore
    plan: PlanRecord
    total_steps: Positive
    scaler: ScalerState | None
    rng: RngState
    cache: CacheRecord
    config_hash: str
    world_size: Positive
    global_batch: Positive
    precision: str
    versions: dict[str, str]
    optimizer: OptimizerState | None = None  # filled in by the Checkpointer, which owns the tensors
    backend: str = "torch"  # the framework that saved it (engine.backends); absent before there were two
    evals_since_best: Count = 0  # evals without a new best eval loss, for train.early_stop_patience
    guard: GuardRecord = field(default_factory=GuardRecord)  # absent before there was a guard

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> "TrainerState":
        return decode_file(cls, data, source)


@dataclass
class Fallback:
    """A rung of the OOM ladder (engine.oom) a run took: out of device memory after `step` steps,
    it goes on with these settings (the same global batch, so the same math)."""

    step: Count
    micro_batch: Positive
    grad_accum: Positive
    grad_checkpointing: bool
    message: str
    job: str | None = None  # taken under torchrun: its job id, so that job's restart of the group continues the run


@dataclass
class RunRecord:
    """One entry of run.json's history: a start or resume of the run."""

    run: Positive
    started: float
    start_step: Count
    resumed_from: str | None
    log: str
    world_size: Positive
    precision: str
    hardware: dict[str, Any]
    auto_plan: dict[str, Any] | None = None  # engine.planner's result when `train --auto-plan` chose the settings
    fallbacks: list[Fallback] = field(default_factory=list)  # the OOM ladder's rungs this run took or began with


@dataclass
class RunFile:
    """run.json: the run's config (engine.config.RunConfig's schema) and its history."""

    config: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    # A rung a rank took under torchrun, where the group cannot go on: the run's next start (torchrun's
    # restart of the group, `resume`, or `train` again) begins with it and records it in its history.
    pending_fallback: Fallback | None = None
    format: Literal[RUN_FORMAT] = RUN_FORMAT  # absent in files written before it was recorded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> "RunFile":
        return decode_file(cls, data, source)

    def next_run(self) -> int:
        return max((r.run for r in self.runs), default=0) + 1


def load_trainer_state(folder: Path) -> TrainerState:
    """A checkpoint folder's trainer_state.json, checked whole; UserError names the file and field."""
    file = Path(folder) / TRAINER_STATE
    return TrainerState.from_dict(read_file(file), file)


def read_file(file: Path) -> Any:
    try:
        return read_json(file)
    except FileNotFoundError:
        raise UserError(f"{file} is missing") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable: {' '.join(str(e).split())}") from None


# --- decoding ---------------------------------------------------------------------------------------


def decode_file(cls: type[R], data: Any, source: str | Path) -> R:
    try:
        return decode(cls, data, "")
    except ShapeError as e:
        raise UserError(f"{source}: {e}") from None


def decode(typ: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as `typ`, or ShapeError naming the dotted field path."""
    marks: tuple[Any, ...] = ()
    if get_origin(typ) is Annotated:
        typ, *rest = get_args(typ)
        marks = tuple(rest)
    origin, args = get_origin(typ), get_args(typ)
    if typ is Any:
        return value
    if origin in (Union, types.UnionType):  # only `X | None` is used: one type, or null
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else decode(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ShapeError(where, f"must be {' or '.join(map(repr, args))}, got {_shown(value)}")
        return value
    if is_dataclass(typ):
        return _record(typ, value, where)
    if origin is list:
        _expect(isinstance(value, list), where, "a list", value)
        if args[0] in EXACT and all(type(v) is args[0] for v in value):  # RNG states: thousands of ints
            return list(value)
        return [decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        _expect(isinstance(value, list), where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        _expect(len(value) == len(args), where, f"a list of {len(args)} items", value)
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        _expect(isinstance(value, dict), where, "an object", value)
        return {k: decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(typ, value, where, marks)


def _scalar(typ: Any, value: Any, where: str, marks: tuple[Any, ...]) -> Any:
    if typ is bool:
        _expect(isinstance(value, bool), where, "true or false", value)
    elif typ is int:
        _expect(type(value) is int, where, "an integer", value)
    elif typ is float:
        _expect(is_number(value), where, "a number", value)
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ShapeError(where, "must be a finite number") from None
        if not math.isfinite(value) and not any(isinstance(m, Unbounded) for m in marks):
            raise ShapeError(where, f"must be a finite number, got {_shown(value)}")
    elif typ is str:
        _expect(isinstance(value, str), where, "a string", value)
        if any(isinstance(m, NoNul) for m in marks) and "\0" in value:
            raise ShapeError(where, "must not contain a NUL byte")
    else:
        raise TypeError(f"no decoder for {typ!r}")
    for mark in marks:
        if isinstance(mark, Min) and not value >= mark.value:
            raise ShapeError(where, f"must be >= {mark.value:g}, got {_shown(value)}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _record(cls: type, value: Any, where: str) -> Any:
    _expect(isinstance(value, dict), where, "an object", value)
    hints = _hints(cls)
    known = [f for f in fields(cls) if f.init]
    unknown = sorted(set(value) - {f.name for f in known})
    if unknown:
        raise ShapeError(_join(where, unknown[0]), "is not a known field")
    kwargs = {}
    for f in known:
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], _join(where, f.name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ShapeError(_join(where, f.name), "is missing")
    try:
        record = cls(**kwargs)
    except UserError as e:  # a record's own check, e.g. Schedule's kind
        raise ShapeError(where, str(e)) from None
    problem = getattr(record, "problem", None)
    found = problem() if problem is not None else None
    if found is not None:
        raise ShapeError(_join(where, found[0]), found[1])
    return record


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expect(ok: bool, where: str, what: str, value: Any) -> None:
    if not ok:
        raise ShapeError(where, f"must be {what}, got {_shown(value)}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> bool:
    """A JSON scalar, or a flat list of numbers (AdamW's betas)."""
    return value is None or isinstance(value, (bool, str)) or is_number(value) or (
        isinstance(value, list) and all(is_number(v) for v in value))


def _shown(value: Any) -> str:
    """repr of a bad value, cut short; containers are summarised before any repr of their insides."""
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "object"
        return f"a {kind} of {len(value)} item(s)" if len(value) > 8 else _cut(repr(value))
    return _cut(repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
