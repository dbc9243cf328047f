"""New-training form. Every field is a RunConfig field; the defaults are valid, so Enter goes on.

Values are collected as a dict and passed through RunConfig.from_dict + validate(), so the form
accepts exactly what a YAML file or the CLI would, with the same one-line messages. Plan runs
`packtrain-engine plan --json` on the form's config (saved first, as Continue saves it) and fills in
the winner: micro-batch and accumulation in their fields, checkpointing and compile in the config.
Each field says when it applies (FieldSpec.shown_when, on the form's choices); one that does not is
hidden, keeps what was typed in it, and goes to the engine at its default, as a YAML file that left it
out would: LoRA's settings are not a full fine-tune's, nor is a method a model from scratch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from app.draft import UNKNOWN_VOCAB, save_config, vocab_guess
from app.engine_client import EngineCommandError, run_json
from app.workers import ReportsWorkerFailures
from engine.config import DEFAULT_LR, PRECISIONS, SCHEDULES, SECTION_TYPES, RunConfig
from engine.errors import UserError
from engine.presets import PRESETS

SOURCE_KINDS = [("stdlib sample (offline)", "stdlib"), ("local file or folder", "local"), ("hub dataset", "hub")]
TOKENIZERS = ["bpe:8192", "bpe:16384", "bpe:32000", "bytes", "gpt2", "meta-llama/Llama-3.2-1B"]


@dataclass(frozen=True)
class Choices:
    """What the form's selects say, which decides the fields that apply."""

    source: str  # a SOURCE_KINDS value
    start: str  # a START_KINDS value
    method: str  # a METHOD_OPTIONS value; a method applies only to a pretrained start


def always(_: Choices) -> bool:
    return True


def given_source(c: Choices) -> bool:
    return c.source != "stdlib"


def hub_source(c: Choices) -> bool:
    return c.source == "hub"


def from_scratch(c: Choices) -> bool:
    return c.start == "scratch"


def pretrained(c: Choices) -> bool:
    return c.start == "pretrained"


def adapter(c: Choices) -> bool:
    return pretrained(c) and c.method != "full"


def qlora(c: Choices) -> bool:
    return pretrained(c) and c.method == "qlora"


@dataclass(frozen=True)
class FieldSpec:
    """One input bound to `section.name` in RunConfig; `optional` means blank is None. Shown only
    when `shown_when` holds for the form's choices; hidden, it gives the engine its default."""

    section: str
    name: str
    label: str
    kind: str = "text"  # text | integer | number | select
    optional: bool = False
    placeholder: str = ""
    shown_when: Callable[[Choices], bool] = always

    @property
    def id(self) -> str:
        return f"f-{self.section}-{self.name}"

    @property
    def row_id(self) -> str:
        return f"row-{self.id}"

    @property
    def default(self) -> Any:
        """What a config file that leaves the field out gets."""
        return getattr(SECTION_TYPES[self.section](), self.name)


SOURCE_FIELD = FieldSpec("data", "source", "Path or hub name", optional=True, shown_when=given_source,
                         placeholder="a .txt/.jsonl/.parquet file, a folder, or org/dataset")
DATA_FIELDS = (
    FieldSpec("data", "subset", "Subset", optional=True, placeholder="hub subset / config name", shown_when=hub_source),
    FieldSpec("data", "split", "Split", placeholder="train", shown_when=hub_source),
    FieldSpec("data", "max_docs", "Max documents", "integer", True, "blank = all"),
    FieldSpec("data", "tokenizer", "Tokenizer", placeholder="bpe:8192, bytes, a hub name or a folder",
              shown_when=from_scratch),
    FieldSpec("data", "seq_len", "Sequence length", "integer"),
)
TRAIN_FIELDS = (
    FieldSpec("train", "micro_batch", "Micro-batch", "integer"),
    FieldSpec("train", "grad_accum", "Grad accumulation", "integer"),
    FieldSpec("train", "lr", "Learning rate", "number"),
    FieldSpec("train", "warmup_ratio", "Warmup ratio", "number"),
    FieldSpec("train", "estimated_total_sequences", "Full dataset (seqs)", "integer", True,
              "blank = this cache; for smart warmup, the full size"),
    FieldSpec("train", "epochs", "Epochs", "number"),
    FieldSpec("train", "max_steps", "Max steps", "integer", True, "blank = the epoch plan"),
    FieldSpec("train", "save_interval", "Save every (steps)", "integer"),
    FieldSpec("train", "keep_last", "Keep last N", "integer"),
    FieldSpec("train", "log_interval", "Log every (steps)", "integer"),
    FieldSpec("train", "growth_check_interval", "Growth check every", "integer",
              placeholder="0 = only at resume; N = every N steps"),
    FieldSpec("train", "sample_every", "Sample every (steps)", "integer", placeholder="0 = off; N = a sample every N steps"),
    FieldSpec("train", "sample_prompt", "Sample prompt", optional=True, placeholder="blank = a new document"),
    FieldSpec("train", "tracker", "Trackers", optional=True, placeholder="blank = none; tensorboard, wandb, csv"),
)
MODEL_FIELDS = (
    FieldSpec("model", "init_from", "Pretrained model", optional=True, placeholder="a model folder or org/name",
              shown_when=pretrained),
)
LORA_FIELDS = (
    FieldSpec("model", "lora_rank", "LoRA rank", "integer", shown_when=adapter),
    FieldSpec("model", "lora_alpha", "LoRA alpha", "number", shown_when=adapter),
    FieldSpec("model", "lora_dropout", "LoRA dropout", "number", shown_when=adapter),
    FieldSpec("model", "lora_targets", "LoRA targets", optional=True, placeholder="blank = every projection",
              shown_when=adapter),
    FieldSpec("model", "quant_bits", "QLoRA bits", "integer", placeholder="4 or 8 (CUDA only)", shown_when=qlora),
)
METHOD_FIELD = FieldSpec("model", "method", "Method", "select", shown_when=pretrained)
PRESET_FIELD = FieldSpec("model", "preset", "Model preset", "select", shown_when=from_scratch)
SCHEDULE_FIELD = FieldSpec("train", "schedule", "Schedule", "select")
PRECISION_FIELD = FieldSpec("train", "precision", "Precision", "select")
FIELDS = (SOURCE_FIELD, *DATA_FIELDS, *MODEL_FIELDS, METHOD_FIELD, *LORA_FIELDS, PRESET_FIELD, *TRAIN_FIELDS,
          SCHEDULE_FIELD, PRECISION_FIELD)
START_KINDS = [("a preset, from scratch", "scratch"), ("a pretrained model", "pretrained")]
METHOD_OPTIONS = [("full fine-tune", "full"), ("LoRA adapter", "lora"), ("QLoRA (4/8-bit base, CUDA)", "qlora")]


def source_kind(source: str | None) -> str:
    if not source or source == "stdlib":
        return "stdlib"
    return "local" if Path(source).expanduser().exists() or source.startswith((".", "/", "~")) else "hub"


def preset_options(vocab: int) -> list[tuple[str, str]]:
    return [(f"{p.name:<5} {p.n_params(vocab) / 1e6:>8,.1f}M params  {p.use}", p.name) for p in PRESETS.values()]


def form_row(label: str, *widgets: Any, row_id: str | None = None) -> Horizontal:
    return Horizontal(Label(label, classes="form-label"), *widgets, classes="form-row", id=row_id)


def plan_line(result: dict[str, Any]) -> str:
    """What the form says about a plan: the winner and how it compared."""
    winner, trials = result["winner"], result["trials"]
    best = trials[0]
    ok = sum(t["verdict"] == "ok" for t in trials)
    return (f"Plan: micro-batch {winner['micro_batch']} x {winner['grad_accum']}, gradient checkpointing "
            f"{'on' if winner['grad_checkpointing'] else 'off'}, compile {'on' if winner['compile'] else 'off'}: "
            f"{best['tokens_per_sec']:,.0f} tok/s, the fastest of {ok} that fit (of {len(trials)} measured)")


class ConfigFormScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "submit", "Continue"),
    ]

    def __init__(self, draft: RunConfig) -> None:
        super().__init__()
        self.draft = draft

    def compose(self) -> ComposeResult:
        d = self.draft.data
        kind = source_kind(d.source)
        yield Header()
        with VerticalScroll(id="form"):
            yield Static(f"New training: {self.draft.name}", classes="title")
            yield form_row("Source", Select(SOURCE_KINDS, value=kind, allow_blank=False, compact=True, id="source-kind"))
            source = self._input(SOURCE_FIELD)
            if kind == "stdlib":
                source.value = ""  # the sample is the Source select's choice, not a path to offer later
            yield self._row(SOURCE_FIELD, source)
            for spec in DATA_FIELDS:
                yield self._row(spec, self._input(spec))
            yield form_row("Start from", Select(START_KINDS, value="pretrained" if self.draft.model.init_from else "scratch",
                                                allow_blank=False, compact=True, id="start-kind"))
            for spec in MODEL_FIELDS:
                yield self._row(spec, self._input(spec))
            yield self._row(METHOD_FIELD, self._select(METHOD_FIELD, METHOD_OPTIONS))
            for spec in LORA_FIELDS:
                yield self._row(spec, self._input(spec))
            yield self._row(PRESET_FIELD,
                            self._select(PRESET_FIELD, preset_options(vocab_guess(d.tokenizer) or UNKNOWN_VOCAB)))
            yield Static("", id="params", classes="hint")
            for spec in TRAIN_FIELDS[:3]:
                yield self._row(spec, self._input(spec))
            yield self._row(SCHEDULE_FIELD, self._select(SCHEDULE_FIELD, [(s, s) for s in SCHEDULES]))
            for spec in TRAIN_FIELDS[3:7]:
                yield self._row(spec, self._input(spec))
            yield self._row(PRECISION_FIELD, self._select(PRECISION_FIELD, [(p, p) for p in PRECISIONS]))
            for spec in TRAIN_FIELDS[7:]:
                yield self._row(spec, self._input(spec))
            yield Static("", id="form-status", classes="status")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Continue (Enter)", variant="primary", id="submit")
                yield Button("Plan", id="plan")
                yield Button("Back (Esc)", id="back")
        yield Footer()

    @staticmethod
    def _row(spec: FieldSpec, widget: Input | Select[str]) -> Horizontal:
        return form_row(spec.label, widget, row_id=spec.row_id)

    def _drafted(self, spec: FieldSpec) -> Any:
        return getattr(getattr(self.draft, spec.section), spec.name)

    def _select(self, spec: FieldSpec, options: list[tuple[str, str]]) -> Select[str]:
        return Select(options, value=self._drafted(spec), allow_blank=False, compact=True, id=spec.id)

    def _input(self, spec: FieldSpec) -> Input:
        value = self._drafted(spec)
        kwargs: dict[str, Any] = {"suggester": SuggestFromList(TOKENIZERS)} if spec.name == "tokenizer" else {}
        return Input(
            value="" if value is None else str(value), placeholder=spec.placeholder, id=spec.id,
            type=spec.kind, valid_empty=spec.optional, compact=True, **kwargs,  # type: ignore[arg-type]
        )

    def on_mount(self) -> None:
        self._follow_choices()
        self.focus_next(Input)
        self.query_one("#form", VerticalScroll).scroll_home(animate=False)

    def on_select_changed(self, event: Select.Changed) -> None:
        self._follow_choices()

    def choices(self) -> Choices:
        def chosen(select_id: str) -> str:
            return str(self.query_one(f"#{select_id}", Select).value)

        return Choices(source=chosen("source-kind"), start=chosen("start-kind"), method=chosen(METHOD_FIELD.id))

    def _follow_choices(self) -> None:
        """Show only the fields that apply (focus skips hidden rows; they keep what was typed in them)."""
        choices = self.choices()
        for spec in FIELDS:
            self.query_one(f"#{spec.row_id}", Horizontal).display = spec.shown_when(choices)
        self._follow_default_lr(choices.method if pretrained(choices) else "scratch")
        self._show_params()

    def _follow_default_lr(self, start: str) -> None:
        """An LR still at some start's default moves to this start's (a full fine-tune at the
        from-scratch LR would wreck the model); one the user typed stays."""
        lr = self.query_one("#f-train-lr", Input)
        try:
            current = float(lr.value)
        except ValueError:
            return
        if current in DEFAULT_LR.values() and current != DEFAULT_LR[start]:
            lr.value = f"{DEFAULT_LR[start]:g}"

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "f-data-tokenizer":
            self._show_params()

    def _show_params(self) -> None:
        preset = PRESETS.get(str(self.query_one(f"#{PRESET_FIELD.id}", Select).value))
        if pretrained(self.choices()):
            self.query_one("#params", Static).update("Shape, size and tokenizer: the pretrained model's own")
            return
        if preset is None:
            return
        vocab = vocab_guess(self.query_one("#f-data-tokenizer", Input).value)
        note = "" if vocab is not None else f" (vocabulary taken as {UNKNOWN_VOCAB:,} until the engine loads it)"
        self.query_one("#params", Static).update(f"≈ {preset.n_params(vocab or UNKNOWN_VOCAB):,} parameters{note}")

    def collect(self) -> RunConfig:
        """The form's values as a validated RunConfig; raises UserError with the first problem.
        A hidden field gives its default, so what does not apply can neither be refused nor reach
        the engine (LoRA settings under a full fine-tune, a method under a model from scratch)."""
        choices = self.choices()
        data = self.draft.to_dict()
        for spec in FIELDS:
            data[spec.section][spec.name] = self._value(spec) if spec.shown_when(choices) else spec.default
        source = data["data"]["source"]
        if given_source(choices) and not source:
            raise UserError("give a local path or a hub dataset name as the source")
        if choices.source == "local":
            if not Path(source).expanduser().exists():
                raise UserError(f"local source {source!r} does not exist")
            data["data"]["source"] = str(Path(source).expanduser().resolve())
        if pretrained(choices):
            if not data["model"]["init_from"]:
                raise UserError("give a pretrained model folder or hub name to start from")
            local = Path(data["model"]["init_from"]).expanduser()
            if local.is_dir():
                data["model"]["init_from"] = str(local.resolve())
            data["data"]["tokenizer"] = data["model"]["init_from"]  # the cache is built with the model's tokenizer
        return RunConfig.from_dict(data).validate()

    def _value(self, spec: FieldSpec) -> Any:
        if spec.kind == "select":
            return self.query_one(f"#{spec.id}", Select).value
        raw = self.query_one(f"#{spec.id}", Input).value.strip()
        return None if (raw == "" and spec.optional) else raw

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "submit":
            self.action_submit()
        elif event.button.id == "plan":
            self.action_plan()
        else:
            self.app.pop_screen()

    def say(self, text: str, ok: bool | None) -> None:
        """The status line under the fields, scrolled into view: the form is taller than a small terminal.
        `ok` None: neither good nor bad news yet (a plan in progress)."""
        status = self.query_one("#form-status", Static)
        status.update(text)
        status.set_classes("status" if ok is None else "status ok" if ok else "status bad")
        self.call_after_refresh(status.scroll_visible, animate=False)

    def saved(self) -> tuple[RunConfig, Path] | None:
        """The form's config, checked and saved as checkpoints/<name>/config.yaml; None after saying why not."""
        try:
            cfg = self.collect()
        except UserError as e:
            self.say(f"✗ {e}", ok=False)
            return None
        try:
            return cfg, save_config(self.app.layout, cfg)
        except OSError as e:
            self.say(f"✗ cannot save the config in {self.app.layout.model_dir(cfg.name)}: {e.strerror or e}", ok=False)
            return None

    def action_submit(self) -> None:
        saved = self.saved()
        if saved is None:
            return
        cfg, path = saved
        self.say(f"Saved {path}", ok=True)
        self.app.open_cache_for_new(cfg, path)

    def action_plan(self) -> None:
        saved = self.saved()
        if saved is None:
            return
        self.say("Planning: measuring each candidate setting for a few steps (the cache is built first if it is "
                 "missing)...", ok=None)
        self.query_one("#plan", Button).disabled = True
        self.run_worker(self._plan(saved[1]), exclusive=True, group="plan")

    async def _plan(self, path: Path) -> None:
        try:
            result = await run_json(self.app.layout, "plan", "--config", str(path), "--json")
        except EngineCommandError as e:
            self.say(f"✗ plan: {e}", ok=False)
            return
        finally:
            self.query_one("#plan", Button).disabled = False
        winner = result["winner"]
        for name in ("micro_batch", "grad_accum"):
            self.query_one(f"#f-train-{name}", Input).value = str(winner[name])
        self.draft.train.grad_checkpointing = winner["grad_checkpointing"]  # collect() builds on the draft
        self.draft.train.compile = winner["compile"]
        self.say(plan_line(result), ok=True)
