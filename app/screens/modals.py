"""Small modal dialogs: yes/no confirmation, the quit question, and key help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Asks before anything irreversible; says exactly what will happen. Y/Enter yes, N/Esc no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, body: str, yes: str = "Yes", no: str = "Cancel") -> None:
        super().__init__()
        self._title, self._body, self._yes, self._no = title, body, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self._title, classes="dialog-title")
            yield Static(self._body, classes="dialog-body", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self._yes} (y)", variant="error", id="yes")
                yield Button(f"{self._no} (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class QuitScreen(ModalScreen[str]):
    """Leaving while an engine trains: detach (it keeps going) or stop (it saves and ends)."""

    BINDINGS = [
        Binding("d", "choose('detach')", "Detach"),
        Binding("s", "choose('stop')", "Stop"),
        Binding("escape,c", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("Quit packtrain?", classes="dialog-title")
            yield Static(
                f"The engine is still training {self.model}.\n"
                "Detach: training continues; run packtrain again to re-attach.\n"
                "Stop: the engine saves a checkpoint and ends.",
                classes="dialog-body", markup=False,
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button("Detach (d)", variant="primary", id="detach")
                yield Button("Stop (s)", variant="error", id="stop")
                yield Button("Cancel (c)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#detach", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q,enter", "close", "Close")]

    def __init__(self, title: str, lines: list[tuple[str, str]]) -> None:
        super().__init__()
        self._title, self._lines = title, lines

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in self._lines)
        body = "\n".join(f"{k:>{width}}  {v}" for k, v in self._lines)
        with Vertical(classes="dialog"):
            yield Static(self._title, classes="dialog-title")
            yield Static(body, classes="dialog-body", markup=False)
            yield Static("Esc closes this help.", classes="dim")

    def action_close(self) -> None:
        self.dismiss(None)
