"""Model name: suggestions from the engine's suggest_names, typed with completion, checked inline."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.validation import ValidationResult, Validator
from textual.widgets import Footer, Header, Input, OptionList, Static

from app.draft import name_suggestions
from engine.config import RunConfig
from engine.errors import UserError
from engine.names import validate_new_name
from engine.paths import Layout


class NewNameValidator(Validator):
    """Characters, length and uniqueness, with the engine's own wording."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout

    def validate(self, value: str) -> ValidationResult:
        try:
            validate_new_name(value, self.layout)
        except UserError as e:
            return self.failure(str(e))
        return self.success()


class NamingScreen(Screen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, draft: RunConfig) -> None:
        super().__init__()
        self.draft = draft
        self.suggestions: list[str] = []

    def compose(self) -> ComposeResult:
        self.suggestions = name_suggestions(self.draft, self.app.layout)
        yield Header()
        with Vertical(id="naming"):
            yield Static("Name the new model", classes="title")
            yield Static("Letters, digits, '.', '_' or '-'; up to 64 characters. Tab/↓ for suggestions.", classes="hint")
            yield Input(
                value=self.suggestions[0], placeholder="model name", id="name",
                suggester=SuggestFromList(self.suggestions, case_sensitive=False),
                validators=[NewNameValidator(self.app.layout)], validate_on=["changed", "submitted"],
            )
            yield Static("", id="name-status", classes="status")
            yield Static("Suggestions", classes="subtitle")
            yield OptionList(*self.suggestions, id="suggestions")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()
        self._show(self.query_one("#name", Input).validate(self.query_one("#name", Input).value))

    def _show(self, result: ValidationResult | None) -> None:
        status = self.query_one("#name-status", Static)
        if result is None or result.is_valid:
            status.update("✓ available — Enter to continue")
            status.set_classes("status ok")
        else:
            status.update("✗ " + "; ".join(result.failure_descriptions))
            status.set_classes("status bad")

    def on_input_changed(self, event: Input.Changed) -> None:
        self._show(event.validation_result)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._show(event.validation_result)
        if event.validation_result is None or event.validation_result.is_valid:
            self.draft.name = event.value
            self.app.open_config_form(self.draft)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        name_input = self.query_one("#name", Input)
        name_input.value = str(event.option.prompt)
        name_input.focus()
