"""What the dashboard knows about one run, folded from its events with bounded memory.

A run of a million steps must not grow the TUI: curves live in DownsampledSeries (fixed capacity;
when full, neighbouring points merge and the stride doubles), recent gauges in short deques, and
the log in a deque with a line counter so the pane only appends what is new.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from engine import protocol

CURVE_POINTS = 1024
SPARK_POINTS = 120
LOG_LINES = 400


class DownsampledSeries:
    """(x, y) points with a fixed capacity: the whole run at decreasing resolution, never more."""

    def __init__(self, capacity: int = CURVE_POINTS) -> None:
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.capacity = capacity
        self.stride = 1
        self.xs: list[float] = []
        self.ys: list[float] = []
        self._bucket: list[tuple[float, float]] = []

    def append(self, x: float, y: float) -> None:
        if y is None or y != y:  # null or NaN on the wire: nothing to plot
            return
        self._bucket.append((x, y))
        if len(self._bucket) < self.stride:
            return
        self.xs.append(self._bucket[-1][0])
        self.ys.append(sum(v for _, v in self._bucket) / len(self._bucket))
        self._bucket.clear()
        if len(self.xs) >= self.capacity:
            self.xs = self.xs[1::2]
            self.ys = [(a + b) / 2 for a, b in zip(self.ys[0::2], self.ys[1::2])]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """The stored points plus the partial bucket, so the newest value always shows."""
        if not self._bucket:
            return list(self.xs), list(self.ys)
        tail_y = sum(v for _, v in self._bucket) / len(self._bucket)
        return [*self.xs, self._bucket[-1][0]], [*self.ys, tail_y]

    def __len__(self) -> int:
        return len(self.xs) + (1 if self._bucket else 0)


@dataclass
class RunState:
    """The folded view of one engine's event log."""

    model: str = ""
    status: str = "starting"  # starting | running | paused | stopping | finished | error | lost
    started: protocol.RunStarted | None = None
    plan: protocol.Plan | None = None
    step: protocol.Step | None = None
    last_checkpoint: protocol.CheckpointSaved | None = None
    expanded: protocol.CacheExpanded | None = None
    sample: protocol.TrainingSample | None = None  # the latest sample during training, when samples are on
    fallback: protocol.OomFallback | None = None  # the OOM ladder's latest rung
    rollback: protocol.DivergenceRollback | None = None
    finished: protocol.Finished | None = None
    error: str = ""
    error_lines: list[str] = field(default_factory=list)
    loss: DownsampledSeries = field(default_factory=DownsampledSeries)
    eval_loss: DownsampledSeries = field(default_factory=DownsampledSeries)
    tok_curve: DownsampledSeries = field(default_factory=DownsampledSeries)
    rss_curve: DownsampledSeries = field(default_factory=DownsampledSeries)
    device_curve: DownsampledSeries = field(default_factory=DownsampledSeries)
    peak_rss_gb: float = 0.0
    best_eval: float | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    tok_s: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    rss_gb: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    device_gb: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    lr: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    grad_norm: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    log_count: int = 0  # lines ever appended; the pane compares it with what it has shown
    version: int = 0  # bumped per applied batch; views redraw only when it moved

    def apply(self, events: list[protocol.Event]) -> None:
        for e in events:
            self._apply(e)
        for e in events[-LOG_LINES:]:  # older lines of a big batch would scroll away unseen
            line = protocol.describe(e)
            if line is not None:
                self.logs.append(line)
                self.log_count += 1
        self.version += 1

    def _apply(self, e: protocol.Event) -> None:
        if e.ts:
            self.first_ts = e.ts if self.first_ts is None else self.first_ts
            self.last_ts = e.ts
        if isinstance(e, protocol.Step):
            self.step = e
            if self.status in ("starting", "lost"):
                self.status = "running"
            self.loss.append(e.step, e.loss)
            self.tok_curve.append(e.step, e.tokens_per_sec)
            self.rss_curve.append(e.step, e.rss_gb)
            self.device_curve.append(e.step, e.device_mem_gb)
            self.peak_rss_gb = max(self.peak_rss_gb, e.rss_gb)
            self.tok_s.append(e.tokens_per_sec)
            self.rss_gb.append(e.rss_gb)
            self.device_gb.append(e.device_mem_gb)
            self.lr.append(e.lr)
            self.grad_norm.append(e.grad_norm)
        elif isinstance(e, protocol.Eval):
            self.eval_loss.append(e.step, e.loss)
            if math.isfinite(e.loss) and (self.best_eval is None or e.loss < self.best_eval):
                self.best_eval = e.loss
        elif isinstance(e, protocol.RunStarted):
            self.started, self.model = e, e.model
        elif isinstance(e, protocol.Plan):
            self.plan = e
        elif isinstance(e, protocol.TrainingSample):
            self.sample = e
        elif isinstance(e, protocol.CacheExpanded):
            self.expanded = e
        elif isinstance(e, protocol.OomFallback):
            self.fallback = e
        elif isinstance(e, protocol.DivergenceRollback):
            self.rollback = e
        elif isinstance(e, protocol.CheckpointSaved):
            self.last_checkpoint = e
        elif isinstance(e, protocol.State):
            self.status = e.state
        elif isinstance(e, protocol.Error):
            self.error = e.message
            self.error_lines = [line for line in e.detail.splitlines() if line.strip()][-12:]
        elif isinstance(e, protocol.Finished):
            self.finished = e
            self.status = "error" if e.reason == "error" else "finished"

    def fail(self, message: str, lines: list[str]) -> None:
        """The engine vanished or refused to start: keep its words and the last log lines."""
        self.status = "error"
        self.error = message
        self.error_lines = lines or list(self.logs)[-8:]
        self.version += 1

    @property
    def total_steps(self) -> int:
        if self.step is not None:
            return self.step.total_steps
        if self.plan is not None:
            return self.plan.total_steps
        return self.started.total_steps if self.started else 0

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running", "paused", "stopping")
