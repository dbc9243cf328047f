"""Compare: `packtrain-engine compare --json` on the marked checkpoints, shown as one eval table and
the same prompt's sample from each model side by side. The engine loads one model at a time, so
this runs as a short child process and the screen waits on it without blocking the UI."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static
from textual.worker import Worker

from app.engine_client import run_json
from app.formatting import format_count
from app.workers import ReportsWorkerFailures

DEFAULT_PROMPT = "The"
SEED = "0"
MAX_NEW_TOKENS = "48"
COLUMNS = ("Checkpoint", "Step", "Tokens seen", "Loss", "Perplexity", "BPB", "Top-1", "Top-5")


def result_cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["checkpoint"], format_count(r["step"]), format_count(r["tokens_seen"]), f"{r['loss']:.4f}",
            f"{r['perplexity']:,.2f}", f"{r['bpb']:.4f}", f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%")


class CompareScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, entries: list[Any]) -> None:
        super().__init__()
        self.entries = entries

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="compare"):
            yield Static(f"Compare {len(self.entries)} checkpoints", classes="title")
            yield Input(DEFAULT_PROMPT, id="compare-prompt", placeholder="prompt (Enter samples it from each)")
            yield Static("", id="compare-status", markup=False)
            table: DataTable[str] = DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            yield table
            yield Horizontal(id="samples")
        yield Footer()

    def on_mount(self) -> None:
        self.run_compare(DEFAULT_PROMPT)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.run_compare(event.value)

    def say(self, line: str) -> None:
        self.query_one("#compare-status", Static).update(line)

    @work(exclusive=True, group="compare", exit_on_error=False)
    async def run_compare(self, prompt: str) -> None:
        self.say(f"Evaluating and sampling {len(self.entries)} checkpoints (one at a time)...")
        report = await run_json(self.app.layout, "compare", *(str(e.path) for e in self.entries), "--json",
                                "--prompt", prompt, "--seed", SEED, "--max-new-tokens", MAX_NEW_TOKENS)
        table = self.query_one("#compare-table", DataTable)
        table.clear()
        for r in report["results"]:
            table.add_row(*result_cells(r))
        samples = self.query_one("#samples", Horizontal)
        await samples.remove_children()
        await samples.mount_all(
            VerticalScroll(Static(s["checkpoint"], classes="subtitle", markup=False),
                           Static(report["prompt"] + s["text"], markup=False), classes="sample")
            for s in report["samples"]
        )
        self.say(f"Eval on {report['data']}; samples from the same prompt with seed {report['seed']}.")

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        self.say(f"error: {message}")

    def action_back(self) -> None:
        self.app.pop_screen()
