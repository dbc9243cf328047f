"""The cache step before training: validate an existing cache, build a missing one, notice growth.

Everything runs as `packtrain-engine cache ... --events` children whose JSON lines drive the
progress bar, so the TUI shows the engine's own verdicts (bad chunks and their reasons) verbatim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static
from textual.worker import Worker

from app.draft import cache_location
from app.engine_client import EventStream
from app.formatting import format_count
from app.workers import ReportsWorkerFailures
from engine import protocol
from engine.cache.metadata import METADATA_FILE
from engine.config import RunConfig
from engine.paths import Layout


def expansion_notice(before: int | None, after: int) -> str:
    if before is None or after <= before:
        return ""
    return protocol.growth_line(before, after)


def progress_text(e: protocol.CacheProgress) -> str:
    parts = [e.stage]
    if e.docs:
        parts.append(f"{e.docs:,} documents")
    if e.tokens:
        parts.append(f"{e.tokens:,} tokens")
    if e.chunks_total:
        parts.append(f"chunks {e.chunks_done:,}/{e.chunks_total:,}")
    if e.mb_per_s:
        parts.append(f"{e.mb_per_s:,.1f} MB/s")
    parts.append(f"ETA {protocol.format_eta(e.eta_s)}")
    return " · ".join(parts)


def bad_chunks_text(bad: list[dict[str, Any]]) -> str:
    lines = [f"  chunk {b.get('chunk', '?')}: {b.get('reason', 'bad')}" for b in bad[:12]]
    if len(bad) > 12:
        lines.append(f"  ... and {len(bad) - 12} more")
    return "\n".join(lines)


@dataclass
class CacheJob:
    """What the screen must make ready, and the engine command that follows it."""

    model: str
    dataset: str
    path: Path | None
    engine_args: list[str]
    build_args: list[str] | None = None
    expected_sequences: int | None = None  # what the checkpoint trained on (resume only)

    @property
    def verb(self) -> str:
        return "Resume" if self.engine_args[0] == "resume" else "Start"

    @classmethod
    def for_new(cls, layout: Layout, cfg: RunConfig, config_file: Path) -> "CacheJob":
        dataset, path = cache_location(layout, cfg)
        return cls(
            model=cfg.name, dataset=dataset, path=path, engine_args=["train", "--config", str(config_file)],
            build_args=["cache", "build", "--config", str(config_file), "--events"],
        )

    @classmethod
    def for_resume(cls, layout: Layout, entry: Any) -> "CacheJob":
        try:
            state = json.loads((Path(entry.path) / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        cache = state.get("cache") or {}
        path = cache.get("path")
        path = Path(path) if path and Path(path).is_absolute() else (layout.root / path if path else None)
        return cls(
            model=entry.model, dataset=cache.get("dataset_name") or entry.dataset or "?", path=path,
            engine_args=["resume", str(entry.path)], expected_sequences=cache.get("total_sequences"),
        )


class CacheScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("enter", "go", "Start", show=True),
        Binding("r", "repair", "Repair"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, job: CacheJob) -> None:
        super().__init__()
        self.job = job
        self.ready = False
        self.bad: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="cache"):
            yield Static(f"{self.job.verb} {self.job.model}: dataset cache", classes="title")
            yield Static("", id="cache-title", markup=False)
            yield ProgressBar(id="cache-progress", show_eta=False)
            yield Static("", id="cache-detail", markup=False)
            yield Static("", id="cache-result", markup=False)
            yield Static("", id="cache-notice", classes="notice", markup=False)
            yield Static("", id="cache-hint", classes="hint", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.prepare()

    def _set(self, widget_id: str, text: str) -> None:
        self.query_one(f"#{widget_id}", Static).update(text)

    def _where(self) -> str:
        return f"{self.job.dataset} at {self.job.path}"

    @work(exclusive=True, group="cache", exit_on_error=False)
    async def prepare(self, repair: bool = False) -> None:
        self.ready = False
        job = self.job
        exists = job.path is not None and (job.path / METADATA_FILE).is_file()
        if exists:
            self._set("cache-title", f"{'Repairing' if repair else 'Validating'} cache: {self._where()}")
            args = ["cache", "validate", str(job.path), "--events", *(["--repair"] if repair else [])]
        elif job.build_args is not None:
            self._set("cache-title", f"Building cache: {self._where()}")
            args = job.build_args
        else:
            self._set("cache-title", f"Cache missing: {self._where()}")
            self._set("cache-result", "The cache this checkpoint trained on is gone; the engine will say whether "
                                      "it can rebuild it.")
            self._finish_ok(None)
            return
        self._set("cache-hint", "Working... Esc goes back (the engine command is cancelled).")
        stream = EventStream(args)
        ready: protocol.CacheReady | None = None
        async for event in stream.events(self.app.layout):
            if isinstance(event, protocol.CacheProgress):
                bar = self.query_one("#cache-progress", ProgressBar)
                bar.update(total=event.chunks_total or None, progress=event.chunks_done)
                self._set("cache-detail", progress_text(event))
            elif isinstance(event, protocol.CacheReady):
                ready = event
            elif isinstance(event, protocol.Log | protocol.Warning):
                self._set("cache-detail", event.message)
        if ready is None:
            self._failed(stream.message)
            return
        self._report(ready, built=not exists)

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        self._failed(message)

    def _failed(self, message: str) -> None:
        self._set("cache-result", f"✗ {message}")
        self._set("cache-hint", "R retries · Esc goes back")

    def _report(self, ready: protocol.CacheReady, *, built: bool) -> None:
        self.query_one("#cache-progress", ProgressBar).update(total=max(ready.chunks, 1), progress=max(ready.chunks, 1))
        self.bad = list(ready.bad)
        if not ready.ok or self.bad:
            self._set("cache-result", f"✗ {len(self.bad)} bad chunk(s) ({ready.chunks:,} good):\n"
                                      + bad_chunks_text(self.bad))
            self._set("cache-hint", "R repairs exactly these chunks · Esc goes back")
            return
        verb = "Cache ready" if built else "Cache validated"
        self._set("cache-result", f"{verb}: {ready.chunks:,} chunks, {format_count(ready.sequences)} sequences\n"
                                  f"{ready.data_line()}")
        self._finish_ok(ready.sequences)

    def _finish_ok(self, sequences: int | None) -> None:
        if sequences is not None:
            self._set("cache-notice", expansion_notice(self.job.expected_sequences, sequences))
        self.ready = True
        self._set("cache-hint", f"Enter: {self.job.verb.lower()} training · Esc goes back")

    def action_go(self) -> None:
        if not self.ready:
            self.notify("The cache is not ready yet.", severity="warning")
            return
        self.app.start_engine(self.job.model, *self.job.engine_args)

    def action_repair(self) -> None:
        if self.ready:
            return
        self.prepare(repair=bool(self.bad))

    def action_back(self) -> None:
        self.workers.cancel_group(self, "cache")
        self.app.pop_screen()
