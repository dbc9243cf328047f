"""Live view of one engine: headline, progress, loss plot, gauges, plan, checkpoints, log.

The app's engine worker folds events into a RunState and posts a replaceable EngineUpdate; this
screen copies the cheap parts on each update and redraws the plot on a timer, so a burst of
thousands of events costs a handful of repaints.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Log, Static

from app.formatting import format_clock, format_params
from app.run_state import LOG_LINES, RunState
from app.screens.modals import ConfirmScreen, HelpScreen
from app.widgets.loss_plot import LossPlot
from app.widgets.metrics import MetricSparks
from app.widgets.progress import StepProgress
from engine import protocol
from engine.units import format_bytes

PLOT_REDRAW_S = 0.75
HELP = [
    ("s", "save a checkpoint now"),
    ("q", "stop: save a checkpoint and end (asks first)"),
    ("p", "pause / resume between optimizer steps"),
    ("d", "detach: leave the engine training, back to the list"),
    ("Esc", "back to the list (detaches while the engine runs)"),
    ("?", "this help"),
]


def headline(state: RunState) -> str:
    prefix = {"paused": "[PAUSED] ", "stopping": "[STOPPING] "}.get(state.status, "")
    if state.step is not None:
        return prefix + protocol.format_step(state.step, colons=False)
    if state.status == "starting":
        return f"Starting {state.model}..."
    return prefix + f"{state.model}: waiting for the first step"


def status_line(state: RunState) -> str:
    if state.finished is not None:
        f = state.finished
        loss = f" | final loss {f.final_loss:.3f}" if f.final_loss is not None else ""
        return f"Finished ({f.reason}) at step {f.step:,}{loss}. Esc returns to the list."
    if state.status == "error":
        return "The engine stopped with an error. Esc returns to the list."
    return {
        "starting": "Waiting for the engine...",
        "running": "Training. s save · q stop · p pause · d detach · ? help",
        "paused": "Paused. p resumes · q stops · d detaches",
        "stopping": "Stopping: the engine is saving a checkpoint...",
    }.get(state.status, state.status)


def plan_text(state: RunState) -> str:
    """Short lines for the side panel (34 columns at 80x24)."""
    lines = []
    if state.plan is not None:
        p = state.plan
        lines += [f"Plan  {p.total_steps:,} steps · warmup {p.warmup_steps:,}",
                  f"      {p.epochs:g} epoch(s) · {p.schedule}",
                  f"Data  {p.n_sequences:,} seqs · batch {p.global_batch}"]
        if p.n_params:
            lines.append(f"Train {format_params(p.n_trainable)} of {format_params(p.n_params)} params"
                         if p.n_trainable is not None else f"Model {format_params(p.n_params)} params, all train")
    if state.expanded is not None:
        x = state.expanded
        lines.append(protocol.growth_line(x.n_before, x.n_after))
    if state.fallback is not None:
        f = state.fallback
        lines.append(f"OOM   micro {f.micro_batch} x accum {f.grad_accum}" + (" · ckpt" if f.grad_checkpointing else ""))
    if state.rollback is not None:
        r = state.rollback
        lines.append(f"NaN   back to {r.to_step:,} · LR x{r.lr_scale:g}")
    c = state.last_checkpoint
    if c is None:
        lines.append("Saved none yet")
    else:
        lines += [f"Saved step {c.step:,} · {format_bytes(c.bytes)} · {format_clock(c.ts)}", c.display_name]
    return "\n".join(lines)


def sample_text(sample: protocol.TrainingSample) -> Text:
    """The latest sample under the plot: its step, then the prompt (dim) and what the model wrote."""
    return Text.assemble((f"Sample at step {sample.step:,}\n", "bold"), (sample.prompt, "dim"), sample.text)


class DashboardScreen(Screen[None]):
    BINDINGS = [
        Binding("s", "save", "Save"),
        Binding("q", "stop", "Stop"),
        Binding("p", "pause", "Pause/resume"),
        Binding("d", "detach", "Detach"),
        Binding("escape", "back", "Back"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(self, state: RunState) -> None:
        super().__init__()
        self.state = state
        self._plotted = -1
        self._logged = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="dashboard"):
            yield Static("", id="headline", markup=False)
            yield StepProgress(id="progress", show_eta=False)
            with Horizontal(id="dash-main"):
                yield LossPlot(id="loss-plot")
                with Vertical(id="side"):
                    yield MetricSparks(id="sparks")
                    yield Static("", id="plan", markup=False)
            yield Static("", id="sample", markup=False)
            yield Static("", id="error", markup=False)
            yield Log(id="log", max_lines=LOG_LINES, auto_scroll=True)
            yield Static("", id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(PLOT_REDRAW_S, self.redraw_plot)
        self.update_view()
        self.redraw_plot()

    def update_view(self) -> None:
        s = self.state
        self.query_one("#headline", Static).update(headline(s))
        total = s.total_steps or (None if s.active else 1)  # no endless animation once it ended
        self.query_one("#progress", StepProgress).update(total=total, progress=s.step.step if s.step else 0)
        self.query_one(MetricSparks).show({"tok_s": s.tok_s, "rss_gb": s.rss_gb, "device_gb": s.device_gb,
                                           "lr": s.lr, "grad_norm": s.grad_norm})
        self.query_one("#plan", Static).update(plan_text(s))
        self.query_one("#status", Static).update(status_line(s))
        sample = self.query_one("#sample", Static)
        sample.display = s.sample is not None
        if s.sample is not None:
            sample.update(sample_text(s.sample))
        error = self.query_one("#error", Static)
        error.display = bool(s.error)
        if s.error:
            error.update("\n".join([f"Engine error: {s.error}", *s.error_lines]))
        self._append_log()

    def _append_log(self) -> None:
        new = self.state.log_count - self._logged
        if new <= 0:
            return
        lines = list(self.state.logs)[-min(new, LOG_LINES):]
        self.query_one("#log", Log).write_lines(lines)
        self._logged = self.state.log_count

    def redraw_plot(self) -> None:
        if self._plotted == self.state.version:
            return
        self._plotted = self.state.version
        self.query_one(LossPlot).draw({"train": self.state.loss, "eval": self.state.eval_loss})

    def _command(self, command: str, note: str) -> None:
        if not self.state.active:
            self.notify("The engine is not running.", severity="warning")
            return
        self.app.send_engine_command(command)
        self.notify(note)

    def action_save(self) -> None:
        self._command("save", "Asked the engine to save a checkpoint.")

    def action_pause(self) -> None:
        if self.state.status == "paused":
            self._command("resume", "Asked the engine to resume.")
        else:
            self._command("pause", "Asked the engine to pause after this step.")

    def action_stop(self) -> None:
        if not self.state.active:
            self.notify("The engine is not running.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._command("stop", "Stopping: the engine saves a checkpoint, then ends.")

        self.app.push_screen(ConfirmScreen(
            f"Stop training {self.state.model}?",
            "The engine finishes the current step, saves a checkpoint and exits.\n"
            "You can resume it later from the checkpoint list.",
            yes="Stop", no="Keep training",
        ), answered)

    def action_detach(self) -> None:
        self.app.detach()

    def action_back(self) -> None:
        self.app.detach()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen("Dashboard keys", HELP))
