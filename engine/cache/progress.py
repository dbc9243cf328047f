"""Show cache events: a rich progress bar on a terminal, or protocol JSON lines with --events.

The builder emits CacheProgress/CacheReady events (and a Warning, e.g. a BPE vocabulary smaller than
asked); this is the one place that turns them into something a person or a parent process reads.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from engine.protocol import CacheProgress, Event, encode
from engine.protocol import Warning as WarningEvent

STAGE_LABELS = {"tokenizer": "Preparing tokenizer", "build": "Building", "validate": "Validating",
                "repair": "Repairing"}


class CacheReporter:
    """Callable event sink and context manager: `with CacheReporter(events) as report: build(..., on_event=report)`."""

    def __init__(self, events: bool) -> None:
        self.events = events
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "CacheReporter":
        if not self.events and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.fields[total_text]} chunks"),
                TextColumn("{task.fields[docs]:,} docs"), TextColumn("{task.fields[tokens]:,} tokens"),
                TextColumn("{task.fields[mbs]:.1f} MB/s"), TextColumn("ETA {task.fields[eta]}"),
                console=Console(stderr=True), transient=False)
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        if self.events:
            print(encode(event), flush=True)
        elif isinstance(event, WarningEvent):
            print(f"warning: {event.message}", file=sys.stderr, flush=True)
        elif self._progress is not None and isinstance(event, CacheProgress):
            self._show(event)

    def _show(self, e: CacheProgress) -> None:
        from engine.protocol import format_eta

        fields = {"docs": e.docs, "tokens": e.tokens, "mbs": e.mb_per_s,
                  "total_text": f"{e.chunks_total:,}" if e.chunks_total else "?",
                  "eta": format_eta(e.eta_s) if e.eta_s is None or e.eta_s >= 60 else f"{e.eta_s:.0f}s"}
        task = self._tasks.get(e.stage)
        if task is None:
            for stage, other in list(self._tasks.items()):  # an open-ended stage (the tokenizer) is over
                if self._progress.tasks[other].total is None:
                    self._progress.remove_task(other)
                    del self._tasks[stage]
            task = self._tasks[e.stage] = self._progress.add_task(STAGE_LABELS.get(e.stage, e.stage),
                                                                  total=e.chunks_total or None, **fields)
        self._progress.update(task, completed=e.chunks_done, total=e.chunks_total or None, **fields)
