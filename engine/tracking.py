"""Tracking sinks (`--tracker tensorboard,wandb,csv`): the run's events as scalars, and training
samples as text, in TensorBoard, Weights & Biases or a CSV file.

The run log stays the record; a sink is a copy in another tool's format. `metrics` names every
series once, so all sinks show the same ones. Sinks open when the run's header arrives (it carries
the config that asks for them, the model and the run number) and see only what rank 0's RunLog
emits, so a torchrun job tracks once. A sink that fails mid-run is dropped with one warning and the
run trains on: tracking is never needed. Each package is imported when its sink opens; a missing
one was refused when the config was validated (engine.config.tracker_names).
"""

from __future__ import annotations

import csv
import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from engine import protocol as P
from engine.config import tracker_names
from engine.paths import Layout
from engine.report import MARKER_KINDS
from engine.run_log import RunLog

STEP_SCALARS = {  # Step field -> series name
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_sec": "train/tokens_per_sec",
    "tokens_seen": "train/tokens_seen", "rss_gb": "memory/rss_gb", "device_mem_gb": "memory/device_gb",
}
SAMPLES = "samples"
EVENTS = "events"
WANDB_HOST = "api.wandb.ai"
TB_FLUSH_S = 10


@dataclass
class Metrics:
    """What one event says, as a sink writes it: scalars and text at a step."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def metrics(event: P.Event, step: int) -> Metrics | None:
    """The series an event adds to (None for events that only steer a viewer). `step` is where the
    run is, for events that carry no step of their own."""
    if isinstance(event, P.Step):
        return Metrics(event.step, {name: float(getattr(event, key)) for key, name in STEP_SCALARS.items()})
    if isinstance(event, P.Eval):
        return Metrics(event.step, {"eval/loss": event.loss, "eval/perplexity": event.perplexity})
    if isinstance(event, P.TrainingSample):
        return Metrics(event.step, {"samples/seconds": event.seconds}, {SAMPLES: event.prompt + event.text})
    if isinstance(event, P.CheckpointSaved):
        return Metrics(event.step, {"checkpoint/seconds": event.seconds, "checkpoint/bytes": float(event.bytes)})
    if isinstance(event, P.CacheExpanded):
        return Metrics(event.step, {"data/sequences": float(event.n_after), "plan/total_steps": float(event.total_steps_after)})
    raw = event.raw if isinstance(event, P.Unknown) else P.to_dict(event)
    kind = str(raw.get("event", ""))
    marker = next((m for m in MARKER_KINDS if kind.endswith(m)), None)  # the OOM ladder's and the guard's events
    if marker is None:
        return None
    at = raw["step"] if isinstance(raw.get("step"), int) else step
    return Metrics(at, {f"{EVENTS}/{marker}": 1.0}, {EVENTS: f"{kind}: {raw.get('message') or raw.get('reason') or ''}"})


class Sink(Protocol):
    def write(self, m: Metrics, ts: float) -> None: ...

    def close(self) -> None: ...


class CsvSink:
    """training_logs/<model>_run_<k>.csv: one row per value (time, step, name, value), so series
    that appear later (eval, samples, fallbacks) need no new columns."""

    COLUMNS = ("time", "step", "name", "value")

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.file: IO[str] = open(path, "a", encoding="utf-8", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(self.COLUMNS)
        self.path = path

    def write(self, m: Metrics, ts: float) -> None:
        for name, value in [*m.scalars.items(), *m.texts.items()]:
            self.writer.writerow((f"{ts:.3f}", m.step, name, repr(value) if isinstance(value, float) else value))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Event files in training_logs/tensorboard/<model>_run_<k>/ (`tensorboard --logdir
    training_logs/tensorboard` shows every run); samples in the Text tab."""

    def __init__(self, path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(path), flush_secs=TB_FLUSH_S)
        self.path = path

    def write(self, m: Metrics, ts: float) -> None:
        for name, value in m.scalars.items():
            self.writer.add_scalar(name, value, m.step, walltime=ts)
        for name, text in m.texts.items():  # markdown: a code block keeps a sample's spacing
            self.writer.add_text(name, f"```\n{text}\n```", m.step, walltime=ts)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """WANDB_MODE when set (offline, online, disabled); else online only where W&B can log in
    without asking (WANDB_API_KEY or `wandb login`'s netrc entry), offline otherwise: an engine has
    no one to answer a login prompt, and offline never needs the network (`wandb sync` uploads)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        logged_in = netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return None if logged_in else "offline"


class WandbSink:
    """One W&B run per packtrain run (named <model>_run_<k>, grouped by model, with the run's
    config), its files under training_logs/wandb/; samples as a table of (step, text)."""

    def __init__(self, layout: Layout, header: P.RunStarted) -> None:
        import wandb

        self.wandb = wandb
        layout.wandb_parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "packtrain", name=layout.run_log(header.model, header.run).stem,
            group=header.model, config=header.config, dir=str(layout.wandb_parent), mode=wandb_mode(),
            settings=wandb.Settings(silent=True, console="off"),  # stdout may be the --events stream
        )
        self.samples: list[list[Any]] = []

    def write(self, m: Metrics, ts: float) -> None:
        data: dict[str, Any] = dict(m.scalars)
        for name, text in m.texts.items():
            if name == SAMPLES:
                self.samples.append([m.step, text])
                data[name] = self.wandb.Table(columns=["step", "text"], data=list(self.samples))
            else:
                data[name] = text
        self.run.log(data, step=m.step)

    def close(self) -> None:
        self.run.finish()


def open_sink(name: str, layout: Layout, header: P.RunStarted) -> tuple[Sink, str]:
    """The sink and where it writes, for the log line that says so."""
    if name == "csv":
        sink: Sink = CsvSink(layout.metrics_csv(header.model, header.run))
        return sink, str(sink.path)  # type: ignore[attr-defined]
    if name == "tensorboard":
        sink = TensorBoardSink(layout.tensorboard_dir(header.model, header.run))
        return sink, str(sink.path)  # type: ignore[attr-defined]
    wandb = WandbSink(layout, header)
    return wandb, f"{wandb.run.settings.mode} run {wandb.run.name!r} in {layout.wandb_parent / 'wandb'}"


class Trackers:
    """A RunLog sink: opens the sinks the run's header asks for and feeds them every event."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.sinks: dict[str, Sink] = {}
        self.step = 0

    def handle(self, event: P.Event, log: RunLog) -> None:
        if isinstance(event, P.RunStarted):
            self.open(event, log)
            return
        m = metrics(event, self.step) if self.sinks else None
        if m is None:
            return
        self.step = m.step
        for name, sink in list(self.sinks.items()):
            try:
                sink.write(m, event.ts)
            except Exception as e:  # noqa: BLE001 - another tool's failure must not end the training
                self.drop(name, e, log)

    def open(self, header: P.RunStarted, log: RunLog) -> None:
        self.step = header.start_step
        for name in tracker_names((header.config.get("train") or {}).get("tracker")):
            try:
                self.sinks[name], where = open_sink(name, self.layout, header)
            except Exception as e:  # noqa: BLE001
                log.warn(f"tracker {name} could not start ({type(e).__name__}: {e}); training goes on without it")
                continue
            log.info(f"Tracking to {name}: {where}")

    def drop(self, name: str, error: Exception, log: RunLog) -> None:
        sink = self.sinks.pop(name)
        log.warn(f"tracker {name} failed ({type(error).__name__}: {error}); training goes on without it")
        try:
            sink.close()
        except Exception:  # noqa: BLE001 - it already failed once; the warning said so
            pass

    def close(self) -> None:
        """At the end of the run, after its last event: a sink that cannot finish says so on stderr
        (the log is closing), and the run's outcome stands."""
        for name in list(self.sinks):
            try:
                self.sinks.pop(name).close()
            except Exception as e:  # noqa: BLE001
                print(f"warning: tracker {name} did not finish cleanly: {type(e).__name__}: {e}", file=sys.stderr)
