"""`packtrain-engine report NAME`: a model's whole story, from its run logs, as plots and one HTML page.

Every run of the model (its training_logs/<model>_run_<k>.jsonl) is read in slices and folded into
compact columns, so a run of millions of steps costs a few floats per step, never a list of event
objects. The result goes to checkpoints/<model>/report/ (report.html plus the PNGs it embeds),
built in a temporary folder and renamed into place, so a reader sees the old report or the new one.
Import-light: matplotlib is imported when the plots are drawn, torch never.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import catalog
from engine import protocol as P
from engine.atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir, read_json
from engine.errors import UserError
from engine.paths import Layout

REPORT_DIR = "report"
REPORT_FILE = "report.html"
READ_SLICE = 4 << 20  # bytes of log decoded per read
STEP_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "rss_gb", "device_mem_gb")
MARKER_KINDS = ("fallback", "rollback")  # events of the OOM ladder and the divergence guard, when logged


@dataclass
class Marker:
    """Something that happened at a step and is drawn on every curve: a resume, growth, a fallback."""

    step: float
    kind: str  # resume | growth | fallback | rollback
    text: str


@dataclass
class History:
    """What the logs of one model say, in plotting order (runs in order, a NaN between runs so a
    resumed run's curve is never joined to a branch it did not continue)."""

    model: str
    runs: list[dict[str, Any]] = field(default_factory=list)  # header + how the run ended
    columns: dict[str, array] = field(default_factory=lambda: {k: array("d") for k in STEP_FIELDS})
    evals: list[tuple[int, float]] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None

    @property
    def n_steps(self) -> int:
        return sum(1 for s in self.columns["step"] if not math.isnan(s))


def collect(layout: Layout, model: str) -> History:
    logs = catalog.run_logs(layout, model)
    if not logs:
        raise UserError(f"no runs of {model!r}: no training_logs/{model}_run_<k>.jsonl in {layout.root}")
    history = History(model=model)
    for run, path in logs:
        if len(history.columns["step"]):
            for column in history.columns.values():
                column.append(math.nan)
        history.runs.append(_fold_run(history, run, path))
    return history


def _fold_run(h: History, run: int, path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"run": run, "log": str(path), "header": None, "last_step": None, "finished": None}
    offset, step = 0, 0
    while True:
        events, new_offset = P.read_events(str(path), offset, READ_SLICE)
        if new_offset == offset:
            return summary
        offset = new_offset
        for event in events:
            step = _fold_event(h, summary, event, step)


def _fold_event(h: History, summary: dict[str, Any], event: P.Event, step: int) -> int:
    """Fold one event in; returns the step the run is at (for events that carry none)."""
    if isinstance(event, P.RunStarted):
        summary["header"] = P.to_dict(event)
        step = event.start_step
        if event.resumed_from:
            h.markers.append(Marker(step, "resume", f"run {event.run} resumed from {event.resumed_from}"))
    elif isinstance(event, P.Step):
        step = event.step
        for name, column in h.columns.items():
            column.append(_finite(getattr(event, name)))
        summary["last_step"] = step
    elif isinstance(event, P.Eval):
        h.evals.append((event.step, event.loss))
    elif isinstance(event, P.Plan):
        h.plan = P.to_dict(event)
    elif isinstance(event, P.CacheExpanded):
        h.markers.append(Marker(event.step, "growth", f"dataset {event.n_before:,} → {event.n_after:,} sequences, "
                                                      f"{event.total_steps_before:,} → {event.total_steps_after:,} steps"))
    elif isinstance(event, P.Warning):
        h.warnings.append((step, event.message))
        said = next((m for m in MARKER_KINDS if m in event.message.lower()), None)
        if said is not None:  # a fallback or rollback announced as a plain warning
            h.markers.append(Marker(step, said, event.message))
    elif isinstance(event, P.Error):
        h.warnings.append((step, f"error: {event.message}"))
    elif isinstance(event, P.Finished):
        summary["finished"] = P.to_dict(event)
    else:
        _fold_other(h, event.raw if isinstance(event, P.Unknown) else P.to_dict(event), step)
    return step


def _fold_other(h: History, raw: dict[str, Any], step: int) -> None:
    """Events by name, defined here or not yet: OOM fallbacks, rollbacks and samples are shown when
    an engine logs them, whatever their other fields."""
    kind = str(raw.get("event", ""))
    at = raw.get("step") if isinstance(raw.get("step"), int) else step
    marker = next((m for m in MARKER_KINDS if kind.endswith(m)), None)  # `fallback`, `oom_fallback`, ...
    if marker is not None:
        text = str(raw.get("message") or raw.get("reason") or kind)
        h.markers.append(Marker(at, marker, text))
    elif kind == "sample":
        h.samples.append({"step": at, **{k: v for k, v in raw.items() if k not in ("v", "event", "ts")}})


def _finite(v: Any) -> float:
    """Fields a log lacks or wrote as null (a NaN loss) become gaps in the curve."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


# --- what else the report shows ---------------------------------------------------------------------


def run_config(layout: Layout, history: History) -> dict[str, Any] | None:
    """run.json's config (what a resume would use), else the newest run header's."""
    try:
        saved = read_json(layout.run_json(history.model))
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return saved["config"]
    except (OSError, ValueError):
        pass
    headers = [r["header"] for r in history.runs if r["header"]]
    return headers[-1].get("config") if headers else None


def cache_folder(layout: Layout, config: dict[str, Any] | None,
                 checkpoints: list[catalog.CheckpointEntry]) -> Path | None:
    """Where the model's cache is: as its newest checkpoint recorded it, else as its config names it."""
    for entry in checkpoints:
        state = catalog.read_trainer_state(Path(entry.path)) or {}
        path = (state.get("cache") or {}).get("path") if isinstance(state.get("cache"), dict) else None
        if isinstance(path, str) and path:
            return Path(path)
    if not config:
        return None
    from engine.cache.naming import cache_path_for
    from engine.config import RunConfig

    try:
        return cache_path_for(RunConfig.from_dict(config).data, layout)
    except UserError:
        return None


def cache_facts(cache_dir: Path | None) -> tuple[dict[str, Any] | None, dict[int, int]]:
    """(stats.json, document-length histogram) of a cache; (None, {}) when it is gone or unreadable."""
    from engine.cache.metadata import METADATA_FILE, STATS_FILE
    from engine.cache.stats import doc_length_hist

    if cache_dir is None:
        return None, {}
    try:
        stats = read_json(cache_dir / STATS_FILE)
    except (OSError, ValueError):
        stats = None
    try:
        meta = read_json(cache_dir / METADATA_FILE)
        hist = dict(doc_length_hist(meta["chunks"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        hist = {}
    return (stats if isinstance(stats, dict) else None), hist


# --- writing -------------------------------------------------------------------------------------------


def build_report(layout: Layout, model: str) -> dict[str, bytes]:
    """Every file of the report, by name: the PNGs and report.html that embeds them."""
    from engine.report_html import render_html
    from engine.report_plots import render_plots

    history = collect(layout, model)
    checkpoints = catalog.list_checkpoints(layout, model)
    config = run_config(layout, history)
    cache_dir = cache_folder(layout, config, checkpoints)
    stats, hist = cache_facts(cache_dir)
    images = render_plots(history, hist, stats)
    html = render_html(history, config=config, checkpoints=checkpoints, cache_dir=cache_dir, stats=stats,
                       images=images)
    return {**images, REPORT_FILE: html.encode("utf-8")}


def write_report(layout: Layout, model: str) -> Path:
    """Write checkpoints/<model>/report/ whole: built beside it under a temporary name, then renamed
    over the old one, so a crash leaves the old report or the new one (and a .tmp- folder the next
    engine start removes), never a torn one. Returns the path of report.html."""
    files = build_report(layout, model)
    model_dir = layout.model_dir(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / REPORT_DIR
    tmp = model_dir / f"{TMP_PREFIX}{REPORT_DIR}-{uuid.uuid4().hex[:8]}"
    old = model_dir / f"{TMP_PREFIX}{REPORT_DIR}-old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data, sync_dir=False)
        fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.rename(old, target)
        raise
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return target / REPORT_FILE
