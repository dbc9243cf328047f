"""Runs and logs: pick a past (or live) run from training_logs/ and see its curves and summary.

The log is folded into a RunState in slices off the UI thread, so even a very long run's curves
come back downsampled with flat memory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker

from app.engine_client import READ_CHUNK
from app.formatting import format_count, format_loss, format_time
from app.run_state import RunState
from app.widgets.loss_plot import LossPlot
from app.workers import ReportsWorkerFailures
from engine import protocol


def fold_log(path: Path) -> RunState:
    state = RunState()
    offset = 0
    while True:
        events, new_offset = protocol.read_events(str(path), offset, READ_CHUNK)
        if new_offset == offset:
            return state
        state.apply(events)
        offset = new_offset


def run_status(run: Any) -> str:
    if run.live:
        return "running"
    return run.finished or "ended"


def summary(state: RunState) -> str:
    s = state.started
    if s is None:
        return "This log has no run header."
    last = state.step
    duration = (state.last_ts or 0) - (state.first_ts or 0)
    mean_tok = sum(state.tok_curve.points()[1]) / max(1, len(state.tok_curve))
    lines = [
        f"{s.model} run {s.run}: steps {s.start_step:,} → {last.step if last else s.start_step:,} "
        f"of {state.total_steps:,}" + (f", resumed from {s.resumed_from}" if s.resumed_from else ""),
        f"Final loss {format_loss(last.loss if last else None)} · best eval {format_loss(state.best_eval)} · "
        f"tokens {format_count(last.tokens_seen if last else None)}",
        f"Mean {mean_tok:,.0f} tok/s · peak RAM {state.peak_rss_gb:.2f} GB · "
        f"{duration / 60:,.1f} min · world size {s.world_size}"
        + (f" · finished: {state.finished.reason}" if state.finished else ""),
    ]
    if state.error:
        lines.append(f"Error: {state.error}")
    return "\n".join(lines)


class RunsScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("r", "reload", "Refresh")]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="runs"):
            yield Static("Runs and logs", classes="title")
            table: DataTable[str] = DataTable(id="run-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("Model", "Run", "Started", "Steps", "Loss", "Status")
            yield table
            yield Static("No runs in training_logs/ yet.", id="runs-empty", classes="empty-state")
            yield Static("", id="run-summary", markup=False)
            with Horizontal(id="run-plots"):
                yield LossPlot("Loss", id="plot-loss")
                yield LossPlot("Throughput (tok/s)", id="plot-tok")
                yield LossPlot("Memory (GB)", id="plot-mem")
        yield Footer()

    def on_mount(self) -> None:
        self.action_reload()
        self.query_one(DataTable).focus()

    def action_reload(self) -> None:
        self.load_runs()

    @work(exclusive=True, group="run-list", exit_on_error=False)
    async def load_runs(self) -> None:
        """list_runs reads the tail of every log: off the UI thread, so keys stay responsive."""
        runs = await asyncio.to_thread(self.app.catalog.list_runs, self.app.layout)
        table = self.query_one(DataTable)
        table.clear()
        for r in runs:
            steps = f"{format_count(r.last_step)}/{format_count(r.total_steps)}"
            table.add_row(r.model, str(r.run), format_time(r.started), steps, format_loss(r.last_loss),
                          run_status(r), key=str(r.log))
        self.query_one("#runs-empty").display = not runs
        if runs:
            self.show_run(str(runs[0].log))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.show_run(str(event.row_key.value))

    @work(exclusive=True, group="run-view", exit_on_error=False)
    async def show_run(self, log: str) -> None:
        path = Path(log) if Path(log).is_absolute() else self.app.layout.root / log
        state = await asyncio.to_thread(fold_log, path)
        self.query_one("#run-summary", Static).update(summary(state))
        self.query_one("#plot-loss", LossPlot).draw({"train": state.loss, "eval": state.eval_loss})
        self.query_one("#plot-tok", LossPlot).draw({"tok/s": state.tok_curve})
        self.query_one("#plot-mem", LossPlot).draw({"RAM": state.rss_curve, "device": state.device_curve})

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        what = "cannot list the runs" if worker.group == "run-list" else "cannot show this run"
        self.query_one("#run-summary", Static).update(f"✗ {what}: {message}")
