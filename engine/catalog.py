"""What is on disk, as plain data: checkpoints, runs and caches, for the TUI, the CLI and scripts.

Import-light on purpose (json, os, psutil, xxhash and the import-light engine modules): the TUI
calls these functions on every refresh, so they never import torch. Validity in a listing is what
resume applies: every file intact by its hash (engine.manifest; a file is hashed once, and again
only when its size or mtime changes) and a trainer_state.json of the right shape (engine.state), so
a checkpoint resume would skip is never offered as valid or `latest`.

Deleting lives here too, because the TUI's manage screen and `packtrain-engine checkpoints delete`
must apply the same refusals: only committed checkpoint folders inside checkpoints/, never the
`latest` of a model a live engine trains, never the checkpoint a live engine resumed from.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import eval_log
from engine.atomic import TMP_PREFIX, atomic_write_text, fsync_dir, read_json
from engine.control import EngineInfo, engine_lock_held, live_engine, live_engines
from engine.errors import UserError
from engine.manifest import MANIFEST, InvalidCheckpoint, Verdicts, checkpoint_problem, read_manifest, verify
from engine.paths import CHECKPOINT_RE, NAME_RE, Layout, check_name, is_name
from engine.protocol import EvalResult, Event, Finished, Plan, RunStarted, Step, decode, read_events, to_dict
from engine.state import TRAINER_STATE, TrainerState

__all__ = [
    "CheckpointEntry", "RunEntry", "list_checkpoints", "list_runs", "run_logs", "read_run", "list_caches",
    "live_engines", "display_name", "find_checkpoint", "plan_delete", "delete_checkpoints",
]

MODEL_FILE = "model.safetensors"
DELETE_PREFIX = f"{TMP_PREFIX}delete-"
DISPLAY_RE = re.compile(r"^(?P<model>[A-Za-z0-9._-]+)_checkpoint_(?P<step>\d+)_run_(?P<run>\d+)$")
RUN_LOG_RE = re.compile(r"^(?P<model>[A-Za-z0-9._-]+)_run_(?P<run>\d+)\.jsonl$")
TAIL_BYTES = 256 * 1024  # enough for the last step, plan and finished events of any log


def display_name(model: str, step: int, run: int | None) -> str:
    return f"{model}_checkpoint_{step}_run_{run if run is not None else 0}"


# --- one checkpoint folder -----------------------------------------------------------------------


def read_trainer_state(path: Path) -> dict[str, Any] | None:
    try:
        state = read_json(path / TRAINER_STATE)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def read_latest(layout: Layout, model: str) -> str | None:
    """The folder name `latest` points at, if it is a checkpoint name (never a path elsewhere)."""
    try:
        name = layout.latest_pointer(model).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if CHECKPOINT_RE.match(name) else None


def write_latest(layout: Layout, model: str, name: str | None) -> None:
    pointer = layout.latest_pointer(model)
    if name is None:
        pointer.unlink(missing_ok=True)
        fsync_dir(pointer.parent)
    else:
        atomic_write_text(pointer, name + "\n")


def checkpoint_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint folders of one model, newest (highest step) first; symlinks ignored."""
    found = []
    try:
        with os.scandir(model_dir) as it:
            for e in it:
                m = CHECKPOINT_RE.match(e.name)
                if m and e.is_dir(follow_symlinks=False):
                    found.append((int(m.group(1)), Path(e.path)))
    except OSError:
        return []
    return sorted(found, reverse=True)


def remove_checkpoint_dir(path: Path) -> None:
    """Delete crash-safely: one atomic rename out of the namespace, then the slow rmtree. A crash
    mid-delete leaves a .tmp-delete-* folder (removed later), never a half-deleted checkpoint."""
    aside = path.with_name(f"{DELETE_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def state_problem(state: dict[str, Any] | None) -> str | None:
    """Why a trainer_state.json (as read_trainer_state found it) cannot be resumed from, or None."""
    if state is None:
        return f"{TRAINER_STATE} is unreadable"
    try:
        TrainerState.from_dict(state, TRAINER_STATE)
    except UserError as e:
        return str(e)
    return None


def usable_problem(path: Path, verdicts: Verdicts | None = None) -> str | None:
    """Why resume would skip this checkpoint (a torn or corrupt file, or a state of the wrong shape),
    or None: the one rule behind the list's validity, `latest` and the newest valid checkpoint."""
    return verify(path, verdicts) or state_problem(read_trainer_state(path))


def newest_intact(layout: Layout, model: str) -> str | None:
    verdicts = Verdicts(layout.verdicts(model))
    found = next((path.name for _, path in checkpoint_dirs(layout.model_dir(model))
                  if usable_problem(path, verdicts) is None), None)
    verdicts.save()
    return found


# --- listing -------------------------------------------------------------------------------------


@dataclass
class CheckpointEntry:
    model: str
    step: int
    run: int | None
    display_name: str
    path: str
    loss: float | None
    eval_loss: float | None
    saved_at: float | None
    dataset: str | None
    sequences: int | None
    size_bytes: int
    valid: bool
    reason: str | None
    is_latest: bool
    running: bool
    kept_eval: dict[str, Any] | None = None  # the newest `packtrain-engine eval` result of these weights
    is_best: bool = False  # the model's lowest run eval loss: rotation never deletes it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_names(layout: Layout) -> list[str]:
    """Model folders under checkpoints/; a symlinked one is not listed (it may point anywhere, and
    delete and export refuse its checkpoints)."""
    root = layout.checkpoints_root
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and is_name(p.name))
    except OSError:
        return []


def list_checkpoints(layout: Layout, model: str | None = None) -> list[CheckpointEntry]:
    """Every checkpoint of every model (or of `model`), newest save first, torn ones included."""
    entries = []
    for name in [model] if model else model_names(layout):
        latest = read_latest(layout, name)
        running = live_engine(layout, name) is not None
        verdicts = Verdicts(layout.verdicts(name))
        evals = eval_log.read(layout, name)
        mine = []
        for step, path in checkpoint_dirs(layout.model_dir(name)):
            try:
                mine.append(_entry(name, step, path, latest, running, verify(path, verdicts), evals))
            except FileNotFoundError:
                continue  # rotated away while we listed
        scored = [e for e in mine if e.valid and e.eval_loss is not None and math.isfinite(e.eval_loss)]
        if scored:
            min(scored, key=lambda e: (e.eval_loss, e.step)).is_best = True  # Checkpointer._rotate's rule
        entries += mine
        verdicts.save()
    return sorted(entries, key=lambda e: (e.saved_at or 0.0, e.step), reverse=True)


def _entry(model: str, step: int, path: Path, latest: str | None, running: bool, problem: str | None,
           evals: list[EvalResult] | None = None) -> CheckpointEntry:
    """One row; `problem` is what the files' check found, the state's shape is checked here."""
    state = read_trainer_state(path)
    reason = problem or state_problem(state)
    state = state or {}
    cache = state.get("cache") if isinstance(state.get("cache"), dict) else {}
    run = run_of(state)
    kept = None
    if evals and reason is None:
        kept = eval_log.latest(evals, display_name(model, step, run), weights_hash(path))
    size = 0
    saved_at = state.get("saved_at")
    with os.scandir(path) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                size += st.st_size
                if e.name == MANIFEST and not isinstance(saved_at, (int, float)):
                    saved_at = st.st_mtime
    return CheckpointEntry(
        model=model, step=step, run=run, display_name=display_name(model, step, run), path=str(path),
        loss=_num(state.get("loss")), eval_loss=_num(state.get("eval_loss")),
        saved_at=_num(saved_at), dataset=_str(cache.get("dataset_name")), sequences=_int(cache.get("total_sequences")),
        size_bytes=size, valid=reason is None, reason=reason, is_latest=path.name == latest, running=running,
        kept_eval=to_dict(kept) if kept else None,
    )


def weights_hash(path: Path) -> str:
    """The manifest's hash of the weights file: what ties a kept eval result to these exact weights."""
    try:
        entry = read_manifest(path).get(MODEL_FILE)
    except InvalidCheckpoint:
        return ""
    return entry["hash"] if entry else ""


def run_of(state: dict[str, Any] | None) -> int | None:
    """The run number a trainer_state records; anything else counts as unknown (shown as run_0)."""
    return _int((state or {}).get("run"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return v if type(v) is int else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


@dataclass
class RunEntry:
    model: str
    run: int
    log: str
    started: float | None
    last_step: int | None
    total_steps: int | None
    last_loss: float | None
    finished: str | None  # "completed" | "stopped" | "early_stopped" | "error"; None while live or after a kill
    live: bool
    pid: int | None
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_runs(layout: Layout) -> list[RunEntry]:
    """Every run log, newest start first. Reads only each log's first line and last 256 KiB."""
    root = layout.logs_root
    try:
        logs = [p for p in root.iterdir() if RUN_LOG_RE.match(p.name) and p.is_file()]
    except OSError:
        return []
    engines: dict[str, EngineInfo | None] = {}
    runs = []
    for path in logs:
        header = _header(path)
        m = RUN_LOG_RE.match(path.name)
        assert m is not None
        model = header.model if header is not None and is_name(header.model) else m.group("model")
        if model not in engines:
            engines[model] = live_engine(layout, model) if is_name(model) else None
        run = (header.run if header is not None else 0) or int(m.group("run"))
        runs.append(_run_entry(path, header, model, run, engines[model]))
    return sorted(runs, key=lambda r: (r.started or 0.0, r.run), reverse=True)


def run_logs(layout: Layout, model: str) -> list[tuple[int, Path]]:
    """(run, log) for every run log of one model, oldest run first; by file name, so it costs no reads."""
    check_name(model, "model name")
    found = []
    for path in layout.logs_root.glob(f"{model}_run_*.jsonl"):
        m = RUN_LOG_RE.match(path.name)
        if m and m.group("model") == model and path.is_file():
            found.append((int(m.group("run")), path))
    return sorted(found)


def _run_entry(path: Path, header: RunStarted | None, model: str, run: int, engine: EngineInfo | None) -> RunEntry:
    """Events of the wrong shape (hand-edited, another tool's) decode as Unknown, so they read as
    unknown values here and never crash a list."""
    step: Step | None = None
    total: int | None = None
    finished: str | None = None
    for event in _tail_events(path):
        if isinstance(event, Finished) and finished is None:
            finished = event.reason
        elif isinstance(event, Step) and step is None:
            step = event
        elif isinstance(event, Plan) and total is None:
            total = event.total_steps
        if step is not None and finished is not None:
            break
    if step is not None:
        total = step.total_steps
    elif total is None and header is not None:
        total = header.total_steps
    live = engine is not None and Path(engine.log).name == path.name
    return RunEntry(
        model=model, run=run, log=str(path), started=_finite(header.ts) if header else None,
        last_step=step.step if step else (header.start_step if header else None), total_steps=total,
        last_loss=_finite(step.loss) if step else None, finished=None if live else finished, live=live,
        pid=engine.pid if live and engine else None, resumed_from=header.resumed_from if header else None,
    )


def _finite(v: float) -> float | None:
    """NaN (a diverged loss, a null on the wire) reads as unknown in a listing."""
    return v if math.isfinite(v) else None


def _header(path: Path) -> RunStarted | None:
    """The RunStarted a log begins with; None for a log that starts with anything else."""
    try:
        with open(path, "rb") as f:
            event = decode(f.readline().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return event if isinstance(event, RunStarted) else None


def _tail_events(path: Path) -> Iterator[Event]:
    """Complete events in the last TAIL_BYTES of a log, newest first, decoded only as far as the
    caller reads; a torn or non-JSON line is skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line of the window is probably cut
    for raw in reversed(lines):
        try:
            yield decode(raw.decode("utf-8"))
        except ValueError:
            continue


def read_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One run log split for plotting: {"header", "steps", "evals", "checkpoints", "expansions",
    "finished", "offset"}; pass `offset` to protocol.read_events to follow the log from there."""
    events, offset = read_events(str(path))
    out: dict[str, Any] = {"header": None, "steps": [], "evals": [], "checkpoints": [], "expansions": [],
                           "finished": None, "offset": offset}
    lists = {"step": "steps", "eval": "evals", "checkpoint_saved": "checkpoints", "cache_expanded": "expansions"}
    for event in events:
        d = to_dict(event)
        if event.kind == "run" and out["header"] is None:
            out["header"] = d
        elif event.kind in lists:
            out[lists[event.kind]].append(d)
        elif event.kind == "finished":
            out["finished"] = d
    return out


def list_caches(layout: Layout) -> list[dict[str, Any]]:
    """The cache registry (engine.cache.registry), imported on first use to keep this module small."""
    from engine.cache.registry import list_caches as registry_list

    return registry_list(layout)


# --- resolving and deleting ----------------------------------------------------------------------


def find_checkpoint(layout: Layout, ref: str) -> Path:
    """A committed checkpoint folder from a display name (`<model>_checkpoint_<step>_run_<k>`), a
    path, or `<model>/checkpoint_<step>`; UserError unless it lies inside checkpoints/<model>/."""
    m = DISPLAY_RE.match(ref)
    if m and not os.path.exists(ref):
        model, step, run = m.group("model"), int(m.group("step")), int(m.group("run"))
        path = layout.checkpoint_dir(model, step)
        if not path.is_dir():
            raise UserError(f"no checkpoint named {ref!r} in {layout.checkpoints_root}")
        state = read_trainer_state(path)  # unreadable: the name cannot be checked, the folder decides
        if state is not None and (run_of(state) or 0) != run:
            raise UserError(f"no checkpoint named {ref!r}: step {step} of {model} was saved by run {run_of(state) or 0}")
        return _inside_checkpoints(layout, path, ref)
    given = Path(ref).expanduser()
    if not given.is_absolute() and not given.exists():
        given = layout.checkpoints_root / given
    if not given.exists():
        raise UserError(f"no checkpoint {ref!r}: not a display name or an existing checkpoint folder")
    return _inside_checkpoints(layout, given, ref)


def _inside_checkpoints(layout: Layout, path: Path, ref: str) -> Path:
    root = layout.checkpoints_root.resolve()
    real = path.resolve()
    if path.is_symlink() or real.parent.parent != root or not CHECKPOINT_RE.match(real.name) \
            or not NAME_RE.match(real.parent.name) or not real.is_dir():
        raise UserError(f"refusing {ref!r}: not a checkpoint folder inside {root}")
    return real


def plan_delete(layout: Layout, refs: list[str]) -> list[CheckpointEntry]:
    """Resolve and check every ref before anything is deleted; raises UserError on the first
    refusal so a refused command touches nothing."""
    paths: list[Path] = []
    for ref in refs:
        path = find_checkpoint(layout, ref)
        if path not in paths:
            paths.append(path)
    if not paths:
        raise UserError("nothing to delete: give one or more checkpoint names or paths")
    entries = []
    for path in paths:
        model = path.parent.name
        _refuse_if_in_use(layout, model, path)
        latest = read_latest(layout, model)
        step = int(CHECKPOINT_RE.match(path.name).group(1))  # type: ignore[union-attr]
        entries.append(_entry(model, step, path, latest, False, checkpoint_problem(path)))
    return entries


def _refuse_if_in_use(layout: Layout, model: str, path: Path) -> None:
    engine = live_engine(layout, model)
    if engine is None:
        if engine_lock_held(layout, model):
            raise UserError(f"an engine is starting on {model!r}; try again once it runs")
        return
    if path.name == read_latest(layout, model):
        raise UserError(f"refusing to delete {path.name} of {model!r}: it is the latest checkpoint of a live "
                        f"engine (pid {engine.pid})")
    resumed = _resumed_from(engine)
    if resumed is not None and _same_checkpoint(layout, resumed, path):
        raise UserError(f"refusing to delete {path.name} of {model!r}: the live engine (pid {engine.pid}) "
                        "resumed from it")


def _resumed_from(engine: EngineInfo) -> str | None:
    header = _header(Path(engine.log))
    return header.resumed_from if header is not None and header.resumed_from else None


def _same_checkpoint(layout: Layout, ref: str, path: Path) -> bool:
    try:
        return find_checkpoint(layout, ref) == path
    except UserError:
        return False


def delete_checkpoints(layout: Layout, entries: list[CheckpointEntry]) -> list[str]:
    """Delete planned checkpoints; when one was `latest`, point `latest` at the newest intact one
    left (or remove it when none is). Returns the deleted display names."""
    deleted = []
    for entry in entries:
        path = Path(entry.path)
        try:
            remove_checkpoint_dir(path)
        except FileNotFoundError:
            continue  # rotation or another deleter got there first
        deleted.append(entry.display_name)
        if read_latest(layout, entry.model) in (None, path.name):
            write_latest(layout, entry.model, newest_intact(layout, entry.model))
    return deleted
