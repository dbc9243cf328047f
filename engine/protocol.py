"""The engine's event and command schema: dataclasses <-> JSON lines. The single source of truth.

Every event is one JSON object on one line: {"v": SCHEMA_VERSION, "event": <kind>, "ts": <unix>,
...fields}. The engine appends them to training_logs/<model>_run_<k>.jsonl and, with --events,
prints them to stdout, so a parent can follow a run from a pipe or by tailing the log.
Commands travel the other way through the file channel in engine.control.

Import-light on purpose: the TUI imports this module and must never pull in torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from engine.units import format_bytes

SCHEMA_VERSION = 1
NAN = float("nan")


@dataclass(kw_only=True)
class Event:
    kind: ClassVar[str] = "event"
    ts: float = field(default_factory=time.time)


# --- run lifecycle -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunStarted(Event):
    """First line of every run log: enough to list, plot and re-attach without reading further."""

    kind: ClassVar[str] = "run"
    model: str
    run: int
    start_step: int = 0
    total_steps: int = 0
    target_tokens: int = 0
    resumed_from: str | None = None
    pid: int = 0
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Plan(Event):
    kind: ClassVar[str] = "plan"
    total_steps: int
    warmup_steps: int
    n_sequences: int
    global_batch: int
    tokens_per_step: int
    epochs: float = 1.0
    epoch_fraction: float = 1.0
    schedule: str = "cosine"
    previous_total_steps: int | None = None
    n_params: int = 0


@dataclass(kw_only=True)
class Step(Event):
    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_sec: float
    eta_s: float | None  # None: not known yet (the wire's null, never NaN)
    progress_pct: float
    rss_gb: float
    device_mem_gb: float = 0.0
    epoch: int = 0
    tokens_seen: int = 0


@dataclass(kw_only=True)
class Eval(Event):
    kind: ClassVar[str] = "eval"
    step: int
    loss: float
    perplexity: float


@dataclass(kw_only=True)
class CacheExpanded(Event):
    """The cache grew under a run: the rest of the epoch now includes the new sequences."""

    kind: ClassVar[str] = "cache_expanded"
    step: int
    n_before: int
    n_after: int
    total_steps_before: int
    total_steps_after: int


@dataclass(kw_only=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    step: int
    path: str
    display_name: str
    loss: float | None = None
    seconds: float = 0.0
    bytes: int = 0


@dataclass(kw_only=True)
class State(Event):
    """Engine state changes the viewer should reflect: running, paused, stopping."""

    kind: ClassVar[str] = "state"
    state: Literal["running", "paused", "stopping"]
    reason: str = ""


@dataclass(kw_only=True)
class Log(Event):
    kind: ClassVar[str] = "log"
    message: str
    level: Literal["debug", "info", "warning"] = "info"


@dataclass(kw_only=True)
class Warning(Event):  # noqa: A001 - the event is called "warning" on the wire
    kind: ClassVar[str] = "warning"
    message: str


@dataclass(kw_only=True)
class Error(Event):
    kind: ClassVar[str] = "error"
    message: str
    detail: str = ""


@dataclass(kw_only=True)
class Finished(Event):
    kind: ClassVar[str] = "finished"
    step: int
    reason: Literal["completed", "stopped", "error"]
    final_loss: float | None = None
    checkpoint: str | None = None


# --- cache building ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CacheProgress(Event):
    kind: ClassVar[str] = "cache_progress"
    stage: Literal["tokenizer", "build", "validate", "repair"]
    cache: str
    docs: int = 0
    tokens: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    bytes_written: int = 0
    mb_per_s: float = 0.0
    eta_s: float | None = None


@dataclass(kw_only=True)
class CacheReady(Event):
    """A build or validation finished; `bad` lists `{chunk, reason}` for each failed chunk."""

    kind: ClassVar[str] = "cache_ready"
    cache: str
    chunks: int
    sequences: int
    ok: bool = True
    bad: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class Unknown(Event):
    """An event from a newer engine: kept, shown raw, never fatal to a viewer."""

    kind: ClassVar[str] = "unknown"
    raw: dict[str, Any] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted, Plan, Step, Eval, CacheExpanded, CheckpointSaved, State, Log, Warning, Error,
        Finished, CacheProgress, CacheReady,
    )
}


def to_dict(event: Event) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "event": event.kind, **asdict(event)}


def encode(event: Event) -> str:
    """One JSON line, no trailing newline; NaN/inf become null so every reader can parse it."""
    return json.dumps(_finite(to_dict(event)), separators=(",", ":"), allow_nan=False)


def decode(line: str | dict[str, Any]) -> Event:
    """Parse one event: the only place an event is checked. Unknown kinds, missing fields and fields
    of the wrong type (a hand-edited or foreign log) give Unknown, so every reader can format what it
    gets; extra fields from newer engines are dropped. A null in a float field is the wire's NaN/inf
    and comes back as NaN (`float | None` fields keep None: there null means "not known").
    Raises ValueError for a line that is not a JSON object at all."""
    data = json.loads(line) if isinstance(line, str) else line
    if not isinstance(data, dict):
        raise ValueError("an event must be a JSON object")
    kind = data.get("event")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return _unknown(data)
    kwargs: dict[str, Any] = {}
    for name, check, nan_on_null, required in _schema(cls):
        if name not in data:
            if required:
                return _unknown(data)
            continue
        value = data[name]
        if value is None and nan_on_null:
            value = NAN
        elif not check(value):
            return _unknown(data)
        kwargs[name] = value
    return cls(**kwargs)


def _unknown(data: dict[str, Any]) -> Unknown:
    ts = data.get("ts")
    return Unknown(ts=ts if ts.__class__ in (float, int) else 0.0, raw=data)


def _checker(hint: Any) -> Callable[[Any], bool]:
    """A type test for one annotated field; JSON gives exact int/float/str/bool/list/dict, and a
    bool is no number here."""
    origin = get_origin(hint)
    if hint is Any:
        return lambda v: True
    if origin in (Union, UnionType):
        options = [_checker(h) for h in get_args(hint)]
        return lambda v: any(check(v) for check in options)
    if origin is Literal:
        allowed = get_args(hint)
        return lambda v: any(v.__class__ is a.__class__ and v == a for a in allowed)
    if origin is list:
        (item,) = get_args(hint)
        check_item = _checker(item)
        return lambda v: v.__class__ is list and all(check_item(x) for x in v)
    if origin is dict:
        key, val = get_args(hint)
        check_key, check_val = _checker(key), _checker(val)
        return lambda v: v.__class__ is dict and all(check_key(k) and check_val(x) for k, x in v.items())
    if hint is float:
        return lambda v: v.__class__ in (float, int)
    return lambda v: v.__class__ is hint


@cache
def _schema(cls: type[Event]) -> list[tuple[str, Callable[[Any], bool], bool, bool]]:
    """(field, type test, null means NaN, required) for each field of an event class."""
    hints = get_type_hints(cls)
    return [(f.name, _checker(hints[f.name]), hints[f.name] is float,
             f.default is MISSING and f.default_factory is MISSING) for f in fields(cls)]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --- commands (viewer -> engine) -----------------------------------------------------------------

CommandKind = Literal["save", "stop", "stop_at_checkpoint", "pause", "resume"]
COMMANDS: tuple[str, ...] = ("save", "stop", "stop_at_checkpoint", "pause", "resume")


@dataclass(kw_only=True)
class Command:
    """save: checkpoint now; stop: save then exit 0; stop_at_checkpoint: exit after the next
    scheduled save; pause/resume: hold between optimizer steps without exiting."""

    command: CommandKind
    ts: float = field(default_factory=time.time)
    sender: str = ""

    def encode(self) -> str:
        return json.dumps({"v": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def decode(cls, text: str) -> "Command":
        data = json.loads(text)
        if data.get("command") not in COMMANDS:
            raise ValueError(f"unknown command {data.get('command')!r}")
        return cls(command=data["command"], ts=float(data.get("ts", 0.0)), sender=str(data.get("sender", "")))


# --- human-readable formatting shared by the engine's terminal output and the TUI ---------------


def format_eta(seconds: float | None) -> str:
    """HH:MMh for long runs (`04:23h`), MM:SSm under an hour (`07:05m`), '--:--' while unknown:
    a short cache build or the end of a run would otherwise read as a frozen 00:00h."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    if seconds < 3600:
        whole = int(round(seconds))
        return f"{whole // 60:02d}:{whole % 60:02d}m"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}h"


def format_step(e: Step, *, colons: bool = True) -> str:
    """`Step 770/26,235 (2.9%) | Loss: 5.583 | 106,212 tok/s | ETA: 04:23h`."""
    c = ":" if colons else ""
    return (
        f"Step {e.step:,}/{e.total_steps:,} ({e.progress_pct:.1f}%) | Loss{c} {e.loss:.3f} | "
        f"{e.tokens_per_sec:,.0f} tok/s | ETA{c} {format_eta(e.eta_s)}"
    )


def growth_line(n_before: int, n_after: int) -> str:
    """How a grown cache is worded everywhere: the engine's log, the dashboard, the cache screen."""
    return f"Dataset expanded: {n_before:,} → {n_after:,} sequences"


def describe(event: Event) -> str | None:
    """The one wording of each event for a person: the engine's terminal lines and the TUI's log
    pane both print this. None for events that only feed bars, gauges and curves, and for growth
    (CacheExpanded): the engine words that itself in Log lines, the new total only when it moved."""
    e = event
    if isinstance(e, Step):
        return format_step(e)
    if isinstance(e, RunStarted):
        where = f"resumed from {e.resumed_from}" if e.resumed_from else "new run"
        return f"Run {e.run} of {e.model} ({where}), step {e.start_step:,}, world size {e.world_size}, pid {e.pid}"
    if isinstance(e, Plan):
        was = f" (was {e.previous_total_steps:,})" if e.previous_total_steps not in (None, e.total_steps) else ""
        params = f", {e.n_params:,} parameters" if e.n_params else ""
        return (f"Plan: {e.total_steps:,} steps{was}, warmup {e.warmup_steps:,}, {e.epochs:g} epoch(s) of "
                f"{e.n_sequences:,} sequences, global batch {e.global_batch} ({e.tokens_per_step:,} tokens/step), "
                f"{e.schedule}{params}")
    if isinstance(e, CheckpointSaved):
        return f"Saved {e.display_name} ({format_bytes(e.bytes)} in {e.seconds:.1f}s)"
    if isinstance(e, Eval):
        return f"Eval at step {e.step:,}: loss {e.loss:.3f}, perplexity {e.perplexity:,.2f}"
    if isinstance(e, State):
        if e.state == "running" and e.reason == "started":
            return None  # the run header already said so
        return e.state.capitalize() + (f" ({e.reason})" if e.reason else "")
    if isinstance(e, Log):
        return ("warning: " if e.level == "warning" else "") + e.message
    if isinstance(e, Warning):
        return f"warning: {e.message}"
    if isinstance(e, Error):
        return f"error: {e.message}"
    if isinstance(e, Finished):
        return f"Finished ({e.reason}) at step {e.step:,}" + (f", checkpoint {e.checkpoint}" if e.checkpoint else "")
    if isinstance(e, CacheReady):
        return f"Cache ready: {e.chunks:,} chunks, {e.sequences:,} sequences"
    if isinstance(e, Unknown):
        return f"(unknown event) {e.raw}"
    return None


def read_events(path: str, start: int = 0, max_bytes: int | None = None) -> tuple[list[Event], int]:
    """Read complete lines from byte offset `start`; returns events and the offset to resume at.

    A torn last line (the writer is mid-append) is left for the next call, so tailing a live log
    never yields half an event. `max_bytes` bounds one read, so a viewer attaching to a huge log
    decodes it in slices instead of loading it whole; the offset says where to continue.
    """
    events: list[Event] = []
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(-1 if max_bytes is None else max_bytes)
    end = data.rfind(b"\n")
    if end < 0:
        return events, start
    for raw in data[: end + 1].splitlines():
        if raw.strip():
            try:
                events.append(decode(raw.decode("utf-8")))
            except ValueError:
                events.append(Unknown(raw={"line": raw.decode("utf-8", "replace")}))
    return events, start + end + 1
