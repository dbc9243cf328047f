"""Home: every checkpoint of every model, newest first, with live engines marked `running: attach`."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker

from app.engine_client import EventStream
from app.formatting import format_count, format_loss, format_time
from app.screens.compare import CompareScreen
from app.screens.extend import ExtendScreen
from app.screens.manage import ManageScreen
from app.screens.modals import HelpScreen
from app.screens.playground import PlaygroundScreen
from app.screens.runs import RunsScreen
from app.workers import ReportsWorkerFailures
from engine import control
from engine import protocol as P
from engine.units import format_bytes

RUNNING = "running: attach"
HELP = [
    ("Enter", "resume the highlighted checkpoint, or attach to its running engine"),
    ("G", "playground: generate text from the highlighted checkpoint"),
    ("Space", "mark or unmark the highlighted checkpoint (for E and C)"),
    ("E", "evaluate the marked checkpoints (or the highlighted one): eval loss and BPB columns"),
    ("C", "compare the marked checkpoints: one eval table and the same prompt from each"),
    ("n", "start a new training"),
    ("t or +", "train the highlighted checkpoint's run longer: a new total of steps or epochs"),
    ("x", "manage checkpoints: select and delete, oldest first"),
    ("l", "runs and logs: curves and summaries of past runs"),
    ("r", "refresh now (the list also refreshes every few seconds)"),
    ("q", "quit (asks first while attached to a training engine)"),
]
REFRESH_S = 3.0
COLUMNS = ("Checkpoint", "Status", "Step", "Loss", "Eval", "BPB", "Saved", "Dataset", "Seqs", "Size")
MARK = "* "


def status_of(entry: Any, live: set[str]) -> str:
    if entry.model in live:
        return RUNNING
    if not entry.valid:
        return "invalid"
    tags = [tag for tag, on in (("latest", entry.is_latest), ("best", entry.is_best)) if on]
    return ", ".join(tags) or "valid"


def kept_eval_cells(entry: Any) -> tuple[str, str]:
    """Eval loss and bits per byte of the newest `eval` of these exact weights, kept by the engine."""
    kept = entry.kept_eval
    return (format_loss(kept["loss"]), f"{kept['bpb']:.3f}") if kept else ("-", "-")


class CheckpointsScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("enter", "open", "Resume / attach", show=True),
        Binding("g,G", "playground", "Play"),
        Binding("space", "mark", "Mark", show=False),
        Binding("e,E", "evaluate", "Eval"),
        Binding("c,C", "compare", "Compare"),
        Binding("n", "new", "New"),
        Binding("t,plus", "extend", "Extend"),
        Binding("x", "manage", "Manage"),
        Binding("l", "runs", "Runs"),
        Binding("r", "reload", "Refresh", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, Any] = {}
        self.live: set[str] = set()
        self.marked: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="home"):
            yield Static("Checkpoints", classes="title")
            table: DataTable[str] = DataTable(id="checkpoints", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            yield table
            yield Static("", id="detail", markup=False)
            yield Static("", id="activity", markup=False)
            yield Static(
                "No checkpoints yet.\nPress N to start a new training.", id="empty", classes="empty-state"
            )
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.set_interval(REFRESH_S, self.reload)
        self.query_one(DataTable).focus()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        layout = self.app.layout
        checkpoints = self.app.catalog.list_checkpoints(layout)
        live = {info.model for info in control.live_engines(layout)}
        rows: list[tuple[str, tuple[str, ...]]] = []
        shown_live: set[str] = set()
        for model in sorted(live - {c.model for c in checkpoints}):
            rows.append((f"live:{model}", (model, RUNNING, *["-"] * (len(COLUMNS) - 2))))
            shown_live.add(model)
        self.entries = {}
        for c in checkpoints:
            key = f"ckpt:{c.path}"
            self.entries[key] = c
            rows.append((key, (
                (MARK if key in self.marked else "") + c.display_name, status_of(c, live), format_count(c.step),
                format_loss(c.loss), *kept_eval_cells(c), format_time(c.saved_at), c.dataset or "-", format_count(c.sequences), format_bytes(c.size_bytes),
            )))
        self.live = live
        self.marked &= set(self.entries)
        self._fill(rows)

    def _fill(self, rows: list[tuple[str, tuple[str, ...]]]) -> None:
        table = self.query_one(DataTable)
        current = self._current_key()
        if [str(k.value) for k in table.rows] != [k for k, _ in rows] or self._cells_changed(table, rows):
            table.clear(columns=True)  # columns too, so their widths shrink back to the content
            table.add_columns(*COLUMNS)
            for key, cells in rows:
                table.add_row(*cells, key=key)
            if current is not None and current in table.rows:
                table.move_cursor(row=table.get_row_index(current))
        empty = not rows
        self.query_one("#empty").display = empty
        table.display = not empty
        self._show_detail(self._current_key())

    def _show_detail(self, key: str | None) -> None:
        entry = self.entries.get(key or "")
        if key and key.startswith("live:"):
            text = f"An engine is training {key.removeprefix('live:')}; Enter attaches to it."
        elif entry is None:
            text = ""
        else:
            parts = [entry.path, f"dataset {entry.dataset or '?'}", f"{format_count(entry.sequences)} sequences"]
            if entry.eval_loss is not None:
                parts.append(f"eval loss {entry.eval_loss:.3f}")
            if not entry.valid:
                parts.append(f"invalid: {entry.reason}")
            text = " · ".join(parts)
        self.query_one("#detail", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(self._current_key())

    @staticmethod
    def _cells_changed(table: DataTable[str], rows: list[tuple[str, tuple[str, ...]]]) -> bool:
        return any(tuple(table.get_row(key)) != cells for key, cells in rows)

    def _current_key(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:  # noqa: BLE001 - an empty or shrinking table has no current row
            return None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self._open(str(event.row_key.value))

    def action_open(self) -> None:
        key = self._current_key()
        if key is not None:
            self._open(key)

    def action_extend(self) -> None:
        entry = self.entries.get(self._current_key() or "")
        if entry is None:
            self.notify("Highlight a checkpoint to train on from.", severity="warning")
        elif entry.model in self.live:
            self.notify(f"An engine is training {entry.model}; Enter attaches to it.", severity="warning")
        elif not entry.valid:
            self.notify(f"{entry.display_name} is not valid: {entry.reason}", severity="warning")
        else:
            def chosen(args: list[str] | None) -> None:
                if args:
                    self.app.start_engine(entry.model, *args)

            self.app.push_screen(ExtendScreen(entry), chosen)

    def _open(self, key: str) -> None:
        if key.startswith("live:"):
            self.app.attach(key.removeprefix("live:"))
            return
        entry = self.entries.get(key)
        if entry is None:
            return
        if entry.model in self.live:
            self.app.attach(entry.model)
        elif not entry.valid:
            self.notify(f"{entry.display_name} is not valid: {entry.reason}", severity="warning")
        else:
            self.app.open_resume(entry)

    def chosen(self) -> list[Any]:
        """The marked checkpoints, else the highlighted one; only valid ones can be loaded."""
        keys = [k for k in self.entries if k in self.marked] or [self._current_key() or ""]
        return [self.entries[k] for k in keys if k in self.entries and self.entries[k].valid]

    def action_mark(self) -> None:
        key = self._current_key()
        if key is None or key not in self.entries:
            return
        self.marked ^= {key}
        self.reload()
        table = self.query_one(DataTable)
        table.move_cursor(row=table.cursor_row + 1)

    def action_playground(self) -> None:
        key = self._current_key()
        entry = self.entries.get(key or "")
        if entry is None or not entry.valid:
            self.say("Highlight a valid checkpoint to open the playground.")
            return
        self.app.push_screen(PlaygroundScreen(entry))

    def action_evaluate(self) -> None:
        entries = self.chosen()
        if not entries:
            self.say("Highlight or mark (Space) valid checkpoints to evaluate.")
            return
        self.evaluate(entries)

    def action_compare(self) -> None:
        entries = self.chosen()
        if len(entries) < 2:
            self.say("Mark (Space) two or more valid checkpoints to compare.")
            return
        self.app.push_screen(CompareScreen(entries))

    @work(exclusive=True, group="evaluate", exit_on_error=False)
    async def evaluate(self, entries: list[Any]) -> None:
        """`eval --events` per checkpoint, one after another; the engine keeps each result, so the
        list shows them from its catalog like any other column."""
        failed: list[str] = []
        for i, entry in enumerate(entries, 1):
            which = f"Evaluating {entry.display_name} ({i}/{len(entries)})"
            self.say(f"{which}...")
            stream = EventStream(["eval", str(entry.path), "--events"])
            async for event in stream.events(self.app.layout):
                if isinstance(event, P.EvalProgress):
                    self.say(f"{which}: batch {event.batches_done}/{event.batches_total}")
            if stream.returncode:
                failed.append(f"{entry.display_name}: {stream.message}")
            self.reload()
        self.say("; ".join(failed) if failed else f"Evaluated {len(entries)} checkpoint(s).")

    def say(self, line: str) -> None:
        """One line under the list for what E, C and G did or why they did nothing; none when empty."""
        activity = self.query_one("#activity", Static)
        activity.update(line)
        activity.display = bool(line)

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        self.say(f"error: {message}")

    def action_new(self) -> None:
        self.app.open_new_training()

    def action_manage(self) -> None:
        self.app.push_screen(ManageScreen())

    def action_runs(self) -> None:
        self.app.push_screen(RunsScreen())

    def action_reload(self) -> None:
        self.reload()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen("Checkpoint list keys", HELP))
