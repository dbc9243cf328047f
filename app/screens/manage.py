"""Checkpoint management: pick checkpoints (oldest first, with the space each frees) and delete them
through `packtrain-engine checkpoints delete --yes`, so the engine's refusals apply and are shown."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, SelectionList, Static
from textual.widgets.selection_list import Selection
from textual.worker import Worker

from app.engine_client import run_command
from app.formatting import format_time
from app.screens.modals import ConfirmScreen
from app.workers import ReportsWorkerFailures
from engine import control
from engine.units import format_bytes


def oldest_first(entries: list[Any]) -> list[Any]:
    return sorted(entries, key=lambda c: (c.saved_at or 0, c.model, c.step))


def label(entry: Any, live: set[str]) -> str:
    tags = [t for t, on in (("latest", entry.is_latest), ("running", entry.model in live),
                            ("invalid", not entry.valid)) if on]
    tag = f" [{', '.join(tags)}]" if tags else ""
    return f"{format_bytes(entry.size_bytes):>9}  {entry.display_name}  {format_time(entry.saved_at)}{tag}"


class ManageScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("d,D,delete", "delete", "Delete selected"),  # the hint line says D
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="manage"):
            yield Static("Manage checkpoints (oldest first)", classes="title")
            yield Static("Space selects (size = space freed) · D deletes the selection · Esc goes back", classes="hint")
            yield SelectionList[str](id="to-delete")
            yield Static("", id="selected", classes="status", markup=False)
            yield Static("", id="result", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.query_one(SelectionList).focus()

    def reload(self) -> None:
        layout = self.app.layout
        live = {e.model for e in control.live_engines(layout)}
        entries = oldest_first(self.app.catalog.list_checkpoints(layout))
        self.entries = {str(c.path): c for c in entries}
        selection = self.query_one(SelectionList)
        selection.clear_options()
        selection.add_options([Selection(Text(label(c, live)), str(c.path)) for c in entries])
        if entries:
            selection.highlighted = 0
        self._show_selected()

    def selected(self) -> list[Any]:
        return [self.entries[p] for p in self.query_one(SelectionList).selected if p in self.entries]

    def _show_selected(self) -> None:
        chosen = self.selected()
        total = sum(c.size_bytes or 0 for c in chosen)
        text = f"Selected: {len(chosen)} checkpoint(s), {format_bytes(total)}" if chosen else \
            ("No checkpoints." if not self.entries else "Nothing selected.")
        self.query_one("#selected", Static).update(text)

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        self._show_selected()

    def action_delete(self) -> None:
        chosen = self.selected()
        if not chosen:
            self.notify("Select checkpoints with Space first.", severity="warning")
            return
        total = sum(c.size_bytes or 0 for c in chosen)
        names = "\n".join(f"  {c.display_name} ({format_bytes(c.size_bytes)})" for c in chosen[:10])
        more = f"\n  ... and {len(chosen) - 10} more" if len(chosen) > 10 else ""

        def answered(yes: bool | None) -> None:
            if yes:
                self.delete([str(c.path) for c in chosen])

        self.app.push_screen(ConfirmScreen(
            f"Delete {len(chosen)} checkpoint(s), {format_bytes(total)}?",
            f"{names}{more}\n\nThis cannot be undone.", yes="Delete", no="Keep",
        ), answered)

    @work(exclusive=True, group="delete", exit_on_error=False)
    async def delete(self, paths: list[str]) -> None:
        result_box = self.query_one("#result", Static)
        result_box.update("Deleting...")
        result = await run_command(self.app.layout, "checkpoints", "delete", *paths, "--yes")
        text = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if line.strip())
        result_box.update(text or ("Deleted." if result.ok else result.message))
        self.notify("Deleted." if result.ok else f"Refused: {result.message}",
                    severity="information" if result.ok else "error")
        self.reload()

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        self.query_one("#result", Static).update(f"✗ {message}")
        self.reload()  # whatever did happen shows in the list
