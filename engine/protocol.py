"""The engine's event and command schema: dataclasses <-> JSON lines. The single source of truth.

Every event is one JSON object on one line: {"v": SCHEMA_VERSION, "event": <kind>, "ts": <unix>,
...fields}. The engine appends them to training_logs/<model>_run_<k>.jsonl and, with --events,
prints them to stdout, so a parent can follow a run from a pipe or by tailing the log.
Commands travel the other way: to a training engine through the file channel in engine.control,
to a `serve-model` child as JSON lines on its stdin (ServeCommand below).

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
    n_trainable: int | None = None  # what the optimizer updates when less than n_params (a LoRA adapter)


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
    skipped_steps: int = 0  # updates the divergence guard skipped so far (a non-finite loss or grad norm)


@dataclass(kw_only=True)
class Eval(Event):
    kind: ClassVar[str] = "eval"
    step: int
    loss: float
    perplexity: float


@dataclass(kw_only=True)
class TrainingSample(Event):
    """A short generation from the model being trained (`train.sample_every`): what it writes at
    `step` from the same prompt and the same random draws each time, so samples compare across steps."""

    kind: ClassVar[str] = "sample"
    step: int
    prompt: str
    text: str
    new_tokens: int = 0
    seconds: float = 0.0


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
class OomFallback(Event):
    """The OOM ladder (engine.oom) changed how steps are computed after running out of device
    memory at `step` + 1; the global batch and so the math stay the same."""

    kind: ClassVar[str] = "oom_fallback"
    step: int
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    message: str


@dataclass(kw_only=True)
class DivergenceRollback(Event):
    """`skipped` non-finite steps in a row up to `step`: the run went back to the checkpoint at
    `to_step` and trains on with the LR times `lr_scale` (engine.guard)."""

    kind: ClassVar[str] = "divergence_rollback"
    step: int
    to_step: int
    skipped: int
    lr_scale: float
    message: str


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
    reason: Literal["completed", "stopped", "early_stopped", "error"]
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
    format: str = "text"  # text, or the instruction format found: chat, prompt_response, instruction
    examples: int = 0  # documents or instruction examples in the committed chunks
    trained_share: float | None = None  # share of targets that train (instruction caches); None: all

    def data_line(self) -> str:
        """`chat: 1,200 examples, 38.5% of tokens train` (or `text: 4,000 documents`), as the CLI and
        the cache screen show it."""
        if self.trained_share is None:
            return f"{self.format}: {self.examples:,} documents"
        return f"{self.format}: {self.examples:,} examples, {100 * self.trained_share:.1f}% of tokens train"


# --- using a model: eval, generation, the serve-model child ------------------------------------------


@dataclass(kw_only=True)
class ModelLoaded(Event):
    """A checkpoint is loaded for inference (serve-model announces it before reading commands)."""

    kind: ClassVar[str] = "model_loaded"
    checkpoint: str
    path: str
    step: int
    tokens_seen: int = 0
    n_params: int = 0
    vocab_size: int = 0
    context: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    chat_template: bool = False
    seconds: float = 0.0


@dataclass(kw_only=True)
class GenerationStarted(Event):
    """One sample begins; `prompt_dropped` counts prompt tokens cut to fit the context."""

    kind: ClassVar[str] = "generation_started"
    request: str = ""
    sample: int = 0
    samples: int = 1
    seed: int | None = None
    prompt_tokens: int = 0
    prompt_dropped: int = 0
    max_new_tokens: int = 0


@dataclass(kw_only=True)
class Token(Event):
    """New text of the running sample: append `text` to what came before (it may hold several tokens,
    or none of a character whose bytes are not complete yet)."""

    kind: ClassVar[str] = "token"
    text: str
    request: str = ""
    sample: int = 0


@dataclass(kw_only=True)
class GenerationDone(Event):
    """One sample ended: `text` is all of it; reason eos | length | stop (a stop string, not included)
    | interrupted (a stop command)."""

    kind: ClassVar[str] = "generation_done"
    text: str
    reason: Literal["eos", "length", "stop", "interrupted"]
    request: str = ""
    sample: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    tokens_per_sec: float = 0.0


@dataclass(kw_only=True)
class EvalProgress(Event):
    kind: ClassVar[str] = "eval_progress"
    checkpoint: str
    batches_done: int
    batches_total: int
    tokens: int = 0
    request: str = ""


@dataclass(kw_only=True)
class EvalResult(Event):
    """One evaluation of one checkpoint. bpb = total nats / ln 2 / UTF-8 bytes of the predicted
    tokens' text; top1/top5 are next-token accuracies. Also the record kept in
    checkpoints/<model>/evals.jsonl, where `weights` (the weights file's manifest hash) ties it to
    the exact checkpoint it measured."""

    kind: ClassVar[str] = "eval_result"
    checkpoint: str
    step: int
    data: str
    loss: float
    perplexity: float
    bpb: float
    top1: float
    top5: float
    tokens: int
    bytes: int
    tokens_seen: int = 0
    data_kind: Literal["held-out", "cache", "source"] = "held-out"
    weights: str = ""
    tokens_per_sec: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    request: str = ""


@dataclass(kw_only=True)
class Done(Event):
    """Every serve-model request (generate, eval, load) ends with exactly one of these."""

    kind: ClassVar[str] = "done"
    request: str
    command: str
    status: Literal["ok", "interrupted", "error"] = "ok"
    message: str = ""


@dataclass(kw_only=True)
class Unknown(Event):
    """An event from a newer engine: kept, shown raw, never fatal to a viewer."""

    kind: ClassVar[str] = "unknown"
    raw: dict[str, Any] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted, Plan, Step, Eval, TrainingSample, CacheExpanded, OomFallback, DivergenceRollback, CheckpointSaved,
        State, Log, Warning, Error, Finished, CacheProgress, CacheReady, ModelLoaded, GenerationStarted, Token,
        GenerationDone, EvalProgress, EvalResult, Done,
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


# --- sampling settings and serve-model commands (parent -> `serve-model` stdin) ---------------------


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k / top_p / repetition_penalty None are off;
    max_new_tokens None is min(128, context / 2); seed None picks one (reported, so it can be repeated).
    Sample i of num_samples uses seed + i."""

    max_new_tokens: int | None = None
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    num_samples: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def problem(self) -> str | None:
        """Why these settings are refused (one line naming the flag), or None."""
        checks = (
            ("max_new_tokens", self.max_new_tokens, lambda v: _is_int(v) and v >= 1, "a whole number >= 1", True),
            ("temperature", self.temperature, lambda v: _is_num(v) and v >= 0, "a number >= 0 (0 is greedy)", False),
            ("top_k", self.top_k, lambda v: _is_int(v) and v >= 1, "a whole number >= 1 (leave it out for no top-k)", True),
            ("top_p", self.top_p, lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]", True),
            ("repetition_penalty", self.repetition_penalty, lambda v: _is_num(v) and v > 0, "a number > 0", True),
            ("num_samples", self.num_samples, lambda v: _is_int(v) and 1 <= v <= MAX_SAMPLES, f"in 1..{MAX_SAMPLES}", False),
            ("seed", self.seed, lambda v: _is_int(v) and 0 <= v < 2**63 - MAX_SAMPLES, "a whole number >= 0", True),
        )
        for name, value, ok, want, optional in checks:
            if not (optional and value is None) and not ok(value):
                return f"{name} must be {want}, got {value!r}"
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            return f"stop must be a list of non-empty strings, got {self.stop!r}"
        return None


MAX_SAMPLES = 100


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


@dataclass(kw_only=True)
class ServeCommand:
    """One line on serve-model's stdin: {"v": 1, "command": <kind>, "id": <request id>, ...fields}.
    The id comes back on every event the request causes, ending with a `done` event."""

    kind: ClassVar[str] = "command"
    id: str = ""

    def encode(self) -> str:
        return json.dumps({"v": SCHEMA_VERSION, "command": self.kind, **asdict(self)}, separators=(",", ":"))


@dataclass(kw_only=True)
class GenerateCommand(ServeCommand, SamplingParams):
    """Sample from `prompt` (raw text; empty starts a new document). Sampling fields sit beside it."""

    kind: ClassVar[str] = "generate"
    prompt: str = ""

    def sampling(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


@dataclass(kw_only=True)
class EvalCommand(ServeCommand):
    """Evaluate the loaded checkpoint: the run's held-out chunks, or `cache` / `source` (one of them)."""

    kind: ClassVar[str] = "eval"
    batches: int | None = None
    cache: str | None = None
    source: str | None = None


@dataclass(kw_only=True)
class StopCommand(ServeCommand):
    """Interrupt the running request and drop every one sent before this line."""

    kind: ClassVar[str] = "stop"


@dataclass(kw_only=True)
class LoadCommand(ServeCommand):
    """Replace the loaded checkpoint (the old one stays if this one cannot be loaded)."""

    kind: ClassVar[str] = "load"
    checkpoint: str


@dataclass(kw_only=True)
class QuitCommand(ServeCommand):
    kind: ClassVar[str] = "quit"


SERVE_COMMANDS: dict[str, type[ServeCommand]] = {
    cls.kind: cls for cls in (GenerateCommand, EvalCommand, StopCommand, LoadCommand, QuitCommand)
}


def decode_serve_command(line: str) -> ServeCommand:
    """Parse one command line; ValueError with a one-line reason for anything malformed."""
    try:
        data = json.loads(line)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("a command is a JSON object")
    cls = SERVE_COMMANDS.get(data.get("command", ""))
    if cls is None:
        raise ValueError(f"unknown command {data.get('command')!r}; expected one of {', '.join(SERVE_COMMANDS)}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known) - {"v", "command"})
    if unknown:
        raise ValueError(f"{cls.kind}: unknown field {unknown[0]!r}")
    kwargs = {k: v for k, v in data.items() if k in known}
    missing = [f.name for f in known.values() if f.name not in kwargs and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{cls.kind}: {missing[0]} is missing")
    for name, value in kwargs.items():
        text_field = name in ("id", "prompt", "checkpoint") or (name in ("cache", "source") and value is not None)
        if text_field and not isinstance(value, str):
            raise ValueError(f"{cls.kind}: {name} must be a string")
    command = cls(**kwargs)
    problem = command.sampling().problem() if isinstance(command, GenerateCommand) else None
    if isinstance(command, EvalCommand):
        if command.batches is not None and not (_is_int(command.batches) and command.batches >= 1):
            problem = f"batches must be a whole number >= 1, got {command.batches!r}"
        elif command.cache and command.source:
            problem = "give cache or source, not both"
    if problem:
        raise ValueError(f"{cls.kind}: {problem}")
    return command


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
    skipped = f" | {e.skipped_steps:,} skipped (non-finite)" if e.skipped_steps else ""
    return (
        f"Step {e.step:,}/{e.total_steps:,} ({e.progress_pct:.1f}%) | Loss{c} {e.loss:.3f} | "
        f"{e.tokens_per_sec:,.0f} tok/s | ETA{c} {format_eta(e.eta_s)}{skipped}"
    )


def growth_line(n_before: int, n_after: int) -> str:
    """How a grown cache is worded everywhere: the engine's log, the dashboard, the cache screen."""
    return f"Dataset expanded: {n_before:,} → {n_after:,} sequences"


def one_line(text: str) -> str:
    """Text with its line breaks shown as ⏎, so a multi-line sample stays one log line."""
    return "⏎".join(text.splitlines())


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
        if e.n_params and e.n_trainable is not None:
            params = f", {e.n_trainable:,} of {e.n_params:,} parameters trainable"
        return (f"Plan: {e.total_steps:,} steps{was}, warmup {e.warmup_steps:,}, {e.epochs:g} epoch(s) of "
                f"{e.n_sequences:,} sequences, global batch {e.global_batch} ({e.tokens_per_step:,} tokens/step), "
                f"{e.schedule}{params}")
    if isinstance(e, CheckpointSaved):
        return f"Saved {e.display_name} ({format_bytes(e.bytes)} in {e.seconds:.1f}s)"
    if isinstance(e, Eval):
        return f"Eval at step {e.step:,}: loss {e.loss:.3f}, perplexity {e.perplexity:,.2f}"
    if isinstance(e, TrainingSample):
        prompt = f"{one_line(e.prompt)!r} → " if e.prompt else ""
        return f"Sample at step {e.step:,}: {prompt}{one_line(e.text)}"
    if isinstance(e, State):
        if e.state == "running" and e.reason == "started":
            return None  # the run header already said so
        return e.state.capitalize() + (f" ({e.reason})" if e.reason else "")
    if isinstance(e, Log):
        return ("warning: " if e.level == "warning" else "") + e.message
    if isinstance(e, Warning):
        return f"warning: {e.message}"
    if isinstance(e, (OomFallback, DivergenceRollback)):
        return e.message
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
