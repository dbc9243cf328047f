"""Playground: talk to one checkpoint. A serve-model child keeps it loaded while the screen is open.

Tokens arrive as fast as the model makes them; they are gathered in a buffer and painted a few
times a second (FLUSH_S), so a burst of tokens costs one repaint, not one per token.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Static, TextArea
from textual.worker import Worker

from app.formatting import format_count
from app.model_client import ModelServer
from app.screens.modals import HelpScreen
from app.workers import ReportsWorkerFailures
from engine import protocol as P

FLUSH_S = 0.05
HELP = [
    ("Ctrl+G", "generate from the prompt with the sampling fields' values"),
    ("Ctrl+T", "stop the generation (the text so far stays)"),
    ("Tab", "move between the prompt and the sampling fields"),
    ("Esc", "back to the checkpoint list (the model is unloaded)"),
]
# (field, label, default): blank means the engine's default (off, or min(128, context/2) tokens, or a new seed)
FIELDS = (
    ("temperature", "Temp", "0.8"),
    ("top_k", "Top-k", ""),
    ("top_p", "Top-p", ""),
    ("repetition_penalty", "Rep. pen.", ""),
    ("max_new_tokens", "Max tokens", ""),
    ("seed", "Seed", ""),
)
WHOLE = {"top_k", "max_new_tokens", "seed"}
LABELS = {name: label for name, label, _ in FIELDS}


def sampling_from_fields(values: dict[str, str]) -> P.SamplingParams | str:
    """The form's text as SamplingParams, or the one line that says what is wrong with it."""
    parsed: dict[str, Any] = {}
    for name, label, _ in FIELDS:
        text = values.get(name, "").strip()
        if not text:
            if name == "temperature":
                return f"{label} is needed (0 is greedy)"
            continue
        try:
            parsed[name] = int(text) if name in WHOLE else float(text)
        except ValueError:
            return f"{label} must be {'a whole number' if name in WHOLE else 'a number'}, got {text!r}"
    params = P.SamplingParams(**parsed)
    problem = params.problem()
    if problem is None:
        return params
    name, _, rest = problem.partition(" ")  # the engine's line starts with the field: say it as the form does
    return f"{LABELS.get(name, name)} {rest}"


class PlaygroundScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("ctrl+g", "generate", "Generate", priority=True),
        Binding("ctrl+t", "stop", "Stop", priority=True),
        Binding("escape", "back", "Back"),
        Binding("f1", "help", "Help"),
    ]

    def __init__(self, entry: Any) -> None:
        super().__init__()
        self.entry = entry
        self.server: ModelServer | None = None
        self.loaded = False
        self.request: str | None = None  # the generation running now
        self.requests = 0
        self.text = ""
        self.pending: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="playground"):
            yield Static(f"Playground: {self.entry.display_name}", classes="title", markup=False)
            yield TextArea(id="prompt", soft_wrap=True, show_line_numbers=False)
            with Horizontal(id="sampling"):
                for name, label, default in FIELDS:
                    yield Label(label, classes="field-label")
                    yield Input(default, id=f"f-{name}", classes="field", compact=True)
            yield Static("Starting the model...", id="pg-status", markup=False)
            with VerticalScroll(id="output-box"):
                yield Static("", id="output", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", TextArea).focus()
        self.set_interval(FLUSH_S, self.flush)
        self.serve()

    def on_unmount(self) -> None:
        if self.server is not None:  # the app is exiting or the screen went: never leave a model loaded
            self.server.kill()

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        self.say(f"error: {message}")

    def say(self, line: str) -> None:
        self.query_one("#pg-status", Static).update(line)

    @work(exclusive=True, group="serve", exit_on_error=False)
    async def serve(self) -> None:
        self.server = server = await ModelServer.start(self.app.layout, str(self.entry.path))
        try:
            async for event in server.events():
                self.handle(event)
        finally:
            await server.close()
        self.flush()
        self.request = None
        self.say(f"The model server ended: {server.message}")

    def handle(self, event: P.Event) -> None:
        if isinstance(event, P.ModelLoaded):
            self.loaded = True
            self.say(f"Loaded {event.checkpoint}: {format_count(event.n_params)} parameters, context "
                     f"{event.context}, {event.device} {event.precision}. Ctrl+G generates.")
        elif isinstance(event, P.GenerationStarted):
            self.text, self.pending = "", []
            cut = f", the first {event.prompt_dropped} prompt tokens dropped" if event.prompt_dropped else ""
            self.say(f"Generating (seed {event.seed}{cut})... Ctrl+T stops.")
        elif isinstance(event, P.Token):
            self.pending.append(event.text)
        elif isinstance(event, P.GenerationDone):
            self.pending, self.text = [], event.text
            self.paint()
            self.say(f"Done ({event.reason}): {event.new_tokens} tokens at {event.tokens_per_sec:,.1f} tok/s.")
        elif isinstance(event, P.Done):
            if event.request == self.request:
                self.request = None
            if event.status == "error":
                self.say(f"error: {event.message}")
        elif isinstance(event, P.Error):
            self.say(f"error: {event.message}")

    def flush(self) -> None:
        if self.pending:
            self.text += "".join(self.pending)
            self.pending = []
            self.paint()

    def paint(self) -> None:
        self.query_one("#output", Static).update(self.text)
        self.query_one("#output-box", VerticalScroll).scroll_end(animate=False)

    def action_generate(self) -> None:
        values = {name: self.query_one(f"#f-{name}", Input).value for name, _, _ in FIELDS}
        params = sampling_from_fields(values)
        if isinstance(params, str):
            self.say(params)
            return
        if self.server is None or not self.loaded:
            self.say("The model is not loaded yet.")
            return
        if self.request is not None:
            self.say("Still generating: Ctrl+T stops it.")
            return
        self.requests += 1
        request = f"g{self.requests}"
        prompt = self.query_one("#prompt", TextArea).text
        command = P.GenerateCommand(id=request, prompt=prompt, **vars(params))
        if self.server.send(command):
            self.request = request
        else:
            self.say("The model server is not running.")

    def action_stop(self) -> None:
        if self.server is not None and self.request is not None:
            self.server.send(P.StopCommand())

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen("Playground keys", HELP))
