"""The Python API: `from engine import Trainer`.

    trainer = Trainer(dataset_or_cache, model="tiny", name="my_run", vocab_size=50257,
                      micro_batch=8, lr=6e-4, max_steps=1000, on_event=print)
    finished = trainer.train()            # a protocol Finished event: step, final_loss, checkpoint
    trainer.resume(max_steps=2000)        # the newest valid checkpoint, exactly as `resume` does

It is the CLI's engine called in-process, not a second loop: the same config schema (any `train`
field is a keyword), run assembly (engine.assemble), loop, checkpoints, run log and exact resume,
so a run started here lists in `packtrain-engine runs list`, shows in the TUI and resumes from the
shell, and the other way round. `data` is a packed cache folder (what `cache build` makes), or a
map-style dataset of token rows (engine.cache.rows): every item one row of seq_len + 1 ids, packed
once into a cache under the root so resume reads the same rows, with the tokenizer the ids came
from when `tokenizer=` names it. Bad input raises engine.errors.UserError with the CLI's one-line
message; events go to `on_event` as engine.protocol dataclasses, and to stdout as the CLI's lines
unless `quiet`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import protocol as P
from engine.config import RunConfig
from engine.errors import UserError
from engine.paths import Layout
from engine.presets import PRESETS


class Trainer:
    def __init__(self, data: str | Path | Any, *, model: str = "5M", name: str = "", root: str | Path | None = None,
                 config: RunConfig | str | Path | None = None, vocab_size: int | None = None,
                 eos_id: int | None = None, tokenizer: Any = None, dataset_name: str | None = None,
                 on_event: Callable[[P.Event], None] | None = None, quiet: bool = False, **train: Any) -> None:
        """`model`: a preset name (tiny, 5M, 25M, ...) or a LlamaConfig JSON file. `config`: a RunConfig
        or a YAML/JSON run config to start from; `name`, `model`, `data` and `train` override it.
        For a dataset: `tokenizer` (the one its ids came from: a tokenizer folder, tokenizer.json, hub
        name or `bytes`, a tokenizers.Tokenizer or a transformers tokenizer; the cache and every
        checkpoint keep a copy, so the model generates and exports text), `vocab_size` (the model's
        vocabulary; default the tokenizer's, required without one), `eos_id` (the id generation stops
        at; default the tokenizer's end-of-text token, else 0) and `dataset_name` (its cache folder;
        default: the dataset's class name)."""
        if tokenizer is not None and isinstance(data, (str, Path)):
            raise UserError("tokenizer= is for a dataset of token rows; a packed cache trains with the tokenizer "
                            "it was built with")
        self.layout = Layout.resolve(root)
        self.data, self.vocab_size, self.eos_id, self.tokenizer = data, vocab_size, eos_id, tokenizer
        self.dataset_name = dataset_name
        self.on_event, self.quiet = on_event, quiet
        base = config if isinstance(config, RunConfig) else RunConfig.load(config) if config else RunConfig()
        values = base.to_dict()
        values["name"] = name or values["name"]
        values["model"] = {"preset": model, "model_config": None} if model in PRESETS else \
            {**values["model"], "model_config": str(model)}
        values["train"].update(train)
        self.config = RunConfig.from_dict(values)  # unknown keywords and wrong types: one UserError line

    @property
    def name(self) -> str:
        """The run's name: given, or chosen by the first train() (checkpoints/<name>/)."""
        return self.config.name

    def train(self) -> P.Finished:
        """A new run to its end (or a stop); its checkpoints land in checkpoints/<name>/."""
        from engine.assemble import new_run

        cfg = self.config
        cfg.data.cache = str(self.cache_path())
        cfg.validate()
        return self._run(lambda opts: new_run(cfg, self.layout, opts))

    def resume(self, checkpoint: str | None = None, *, reset_optimizer: bool = False, **changes: Any) -> P.Finished:
        """Continue from `checkpoint` (a display name or folder; default the newest valid one),
        changing only what keeps the computation the same (length, intervals, micro-batch at the
        same global batch...), as `packtrain-engine resume` allows."""
        from engine.assemble import resume_run

        if not self.name:
            raise UserError("nothing to resume: this Trainer has no name yet (train() first, or pass name=)")

        def override(cfg: RunConfig) -> RunConfig:
            values = cfg.to_dict()
            values["train"].update(changes)
            return RunConfig.from_dict(values)

        return self._run(lambda opts: resume_run(checkpoint or self.name, self.layout, opts, override=override,
                                                 reset_optimizer=reset_optimizer))

    def cache_path(self) -> Path:
        """The packed cache this Trainer trains from (a dataset is packed into one on first use)."""
        if isinstance(self.data, (str, Path)):
            return Path(self.data).expanduser().resolve()
        from engine.cache.rows import write_rows_cache

        name = self.dataset_name or type(self.data).__name__.lower()
        return write_rows_cache(self.data, self.layout, name, vocab_size=self.vocab_size, eos_id=self.eos_id,
                                tokenizer=self.tokenizer)

    def _run(self, make: Callable[[Any], Any]) -> P.Finished:
        from engine.assemble import run_to_end
        from engine.train import Options

        callback = Callback(self.on_event)
        opts = Options(quiet=self.quiet, sinks=[callback])

        def build() -> Any:
            trainer = make(opts)
            self.config.name = trainer.s.model_name
            return trainer

        run_to_end(build)
        assert callback.finished is not None  # a run that returns has emitted how it ended
        return callback.finished


class Callback:
    """The user's `on_event` as one of the run log's sinks (engine.run_log.EventSink); it keeps
    the Finished event train() and resume() return."""

    def __init__(self, on_event: Callable[[P.Event], None] | None) -> None:
        self.on_event = on_event
        self.finished: P.Finished | None = None

    def handle(self, event: P.Event, log: Any) -> None:
        if isinstance(event, P.Finished):
            self.finished = event
        if self.on_event is not None:
            self.on_event(event)

    def close(self) -> None:
        return None
