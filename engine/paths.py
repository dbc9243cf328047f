"""The on-disk layout of a packtrain root: the only place that spells out folder and file names.

Root resolution: explicit --root, else $PACKTRAIN_HOME, else the current directory.

    <root>/cache/cache_registry.json
    <root>/cache/precision.json                                  measured precision choices (backends/torch_precision.py)
    <root>/cache/packed_sequences/<seq_len>/<dataset>/          one packed cache
    <root>/checkpoints/<model>/run.json                          config + runs history
    <root>/checkpoints/<model>/checkpoint_<step:06d>/            one committed checkpoint
    <root>/checkpoints/<model>/latest                            names the newest checkpoint
    <root>/checkpoints/<model>/.verified.json                    cached hash verdicts (engine.manifest)
    <root>/checkpoints/<model>/engine.lock | engine.json          live-engine lock and pid file
    <root>/checkpoints/<model>/control/                          command channel (one file per command)
    <root>/checkpoints/<model>/config.yaml                       the TUI form's run config (train --config)
    <root>/checkpoints/<model>/evals.jsonl                       kept eval results (never inside a checkpoint)
    <root>/training_logs/<model>_run_<k>.jsonl                    append-only event log of run k
    <root>/training_logs/<model>.console.log                     stdout/stderr of TUI-started engines
    <root>/training_logs/<model>_run_<k>.csv                      --tracker csv: the run's metrics
    <root>/training_logs/tensorboard/<model>_run_<k>/             --tracker tensorboard: event files
    <root>/training_logs/wandb/                                   --tracker wandb: W&B's own run folders
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError, shown

ENV_HOME = "PACKTRAIN_HOME"
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")


def is_name(name: object) -> bool:
    """Names become folder names, so they must never escape their folder; nor start with '-' (a
    command line would read `-rf` as a flag), nor reach the filesystem longer than it allows."""
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name[0] not in ".-"


def check_name(name: str, what: str = "name") -> str:
    if not is_name(name):
        raise UserError(
            f"invalid {what} {shown(name)}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return name


def check_root(layout: "Layout", *, writable: bool) -> "Layout":
    """Refuse a root that can never hold data (it may not exist yet): one rule for the TUI and
    every engine command. Reading commands need no write access (a read-only mount lists fine)."""
    anchor = layout.root
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"cannot use {layout.root} as the data root: {anchor} is a file, not a folder")
    if writable and not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot use {layout.root} as the data root: {anchor} is not writable")
    return layout


def checkpoint_dirname(step: int) -> str:
    return f"checkpoint_{step:06d}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> "Layout":
        chosen = root if root is not None else os.environ.get(ENV_HOME) or os.getcwd()
        return cls(Path(chosen).expanduser().resolve())

    # cache
    @property
    def cache_root(self) -> Path:
        return self.root / "cache"

    @property
    def packed_root(self) -> Path:
        return self.cache_root / "packed_sequences"

    @property
    def cache_registry(self) -> Path:
        return self.cache_root / "cache_registry.json"

    @property
    def precision_cache(self) -> Path:
        return self.cache_root / "precision.json"

    def cache_dir(self, seq_len: int, dataset: str) -> Path:
        return self.packed_root / str(int(seq_len)) / check_name(dataset, "dataset name")

    # checkpoints
    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    def model_dir(self, model: str) -> Path:
        return self.checkpoints_root / check_name(model, "model name")

    def run_json(self, model: str) -> Path:
        return self.model_dir(model) / "run.json"

    def checkpoint_dir(self, model: str, step: int) -> Path:
        return self.model_dir(model) / checkpoint_dirname(step)

    def latest_pointer(self, model: str) -> Path:
        return self.model_dir(model) / "latest"

    def verdicts(self, model: str) -> Path:
        return self.model_dir(model) / ".verified.json"

    def engine_lock(self, model: str) -> Path:
        return self.model_dir(model) / "engine.lock"

    def engine_pidfile(self, model: str) -> Path:
        return self.model_dir(model) / "engine.json"

    def control_dir(self, model: str) -> Path:
        return self.model_dir(model) / "control"

    def config_yaml(self, model: str) -> Path:
        return self.model_dir(model) / "config.yaml"

    def evals_log(self, model: str) -> Path:
        return self.model_dir(model) / "evals.jsonl"

    # logs
    @property
    def logs_root(self) -> Path:
        return self.root / "training_logs"

    def run_log(self, model: str, run: int) -> Path:
        return self.logs_root / f"{check_name(model, 'model name')}_run_{int(run)}.jsonl"

    def console_log(self, model: str) -> Path:
        return self.logs_root / f"{check_name(model, 'model name')}.console.log"

    def metrics_csv(self, model: str, run: int) -> Path:
        return self.run_log(model, run).with_suffix(".csv")

    def tensorboard_dir(self, model: str, run: int) -> Path:
        return self.logs_root / "tensorboard" / self.run_log(model, run).stem

    @property
    def wandb_parent(self) -> Path:
        """W&B makes its `wandb/` folder inside the folder it is given."""
        return self.logs_root

    def ensure(self) -> "Layout":
        for d in (self.packed_root, self.checkpoints_root, self.logs_root):
            d.mkdir(parents=True, exist_ok=True)
        return self
