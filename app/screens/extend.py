"""Train a checkpoint's run further: a new total of steps or of epochs, as `packtrain-engine resume
<checkpoint> --max-steps N` (or `--epochs E`) would, so the TUI and the CLI extend a run alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from app.screens.config_form import form_row
from engine.catalog import read_trainer_state
from engine.launch import resume_args


def planned_total(entry: Any) -> int | None:
    total = (read_trainer_state(Path(entry.path)) or {}).get("total_steps")
    return total if type(total) is int else None


class ExtendScreen(ModalScreen[list[str] | None]):
    """Dismisses with the engine arguments of the longer run, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, entry: Any) -> None:
        super().__init__()
        self.entry = entry
        self.total = planned_total(entry)

    def compose(self) -> ComposeResult:
        e = self.entry
        where = f"step {e.step:,}" + (f" of {self.total:,}" if self.total else "")
        with Vertical(classes="dialog", id="extend"):
            yield Static(f"Train {e.display_name} longer", classes="dialog-title", markup=False)
            yield Static(f"It is at {where}. Give a new total of steps, or of epochs (the epoch plan then "
                         "decides: a step or token budget is dropped). The LR schedule stretches from here "
                         "without a jump.", classes="dialog-body", markup=False)
            yield form_row("Max steps", Input(type="integer", id="extend-steps", compact=True,
                                              placeholder=f"more than {e.step:,}"))
            yield form_row("Epochs", Input(type="number", id="extend-epochs", compact=True, placeholder="e.g. 2"))
            yield Static("", id="extend-status", classes="status", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Train on (Enter)", variant="primary", id="extend")
                yield Button("Cancel (Esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#extend-steps", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "extend":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def submit(self) -> None:
        try:
            self.dismiss(self.engine_args())
        except ValueError as e:
            status = self.query_one("#extend-status", Static)
            status.update(f"✗ {e}")
            status.set_classes("status bad")

    def engine_args(self) -> list[str]:
        steps_text = self.query_one("#extend-steps", Input).value.strip().replace(",", "")
        epochs_text = self.query_one("#extend-epochs", Input).value.strip()
        if not steps_text and not epochs_text:
            raise ValueError("give a new total of steps or of epochs")
        steps = int(steps_text) if steps_text else None
        epochs = float(epochs_text) if epochs_text else None
        if steps is not None and steps <= self.entry.step:
            raise ValueError(f"the run is at step {self.entry.step:,}: give more steps than that")
        if epochs is not None and not epochs > 0:
            raise ValueError("epochs must be a positive number")
        return resume_args(str(self.entry.path), max_steps=steps, epochs=epochs)
