"""Shared helpers for the TUI tests: screen text, waiting on a Pilot, fake run logs, tiny corpora."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
from rich.console import Console

from engine import protocol as P
from engine.paths import Layout

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: every fake timestamp counts from here


def screen_text(app: Any) -> str:
    """The current screen (with the screens below a modal) as plain text, one line per row."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_for(pilot: Any, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll the running app until `predicate()` is truthy; on timeout fail with the screen shown.

    It sleeps rather than `pilot.pause()`: a pause waits for the app to go idle, which a streaming
    screen does only when its stream ends, so a state that lasts only while it streams was never seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}\n{screen_text(pilot.app)}")
        await asyncio.sleep(0.1)


def form_app(layout: Layout, draft: Any) -> Any:
    """The app with the config form for `draft` (a RunConfig) straight away: no environment screen,
    no engine probe. Imported here, not at the top, so engine-only tests do not load the TUI."""
    from app.app import PacktrainApp
    from app.screens.config_form import ConfigFormScreen

    class FormOnly(PacktrainApp):
        CSS_PATH = REPO / "app" / "app.tcss"  # a relative path would resolve beside this file

        def on_mount(self, event: Any) -> None:
            event.prevent_default()
            self.push_screen(ConfigFormScreen(draft))

    return FormOnly(layout)


def fake_step(step: int, total: int = 1000) -> P.Step:
    return P.Step(
        ts=T0 + step, step=step, total_steps=total, loss=8 * math.exp(-step / 100) + 2.0, lr=1e-3 * min(1, step / 50),
        grad_norm=0.5 + 0.1 * math.sin(step), tokens_per_sec=20_000 + 150 * (step % 7), eta_s=(total - step) * 2.0,
        progress_pct=100 * step / total, rss_gb=1.2 + step / 2000, device_mem_gb=0.0, tokens_seen=step * 2048,
    )


def fake_events(model: str, run: int = 1, steps: int = 300, total: int = 1000, finished: bool = False) -> list[P.Event]:
    events: list[P.Event] = [
        P.RunStarted(ts=T0, model=model, run=run, total_steps=total, pid=4242),
        P.Plan(ts=T0, total_steps=total, warmup_steps=50, n_sequences=8000, global_batch=8, tokens_per_step=2048),
    ]
    for i in range(1, steps + 1):
        events.append(fake_step(i, total))
        if i % 100 == 0:
            events.append(P.Eval(ts=T0 + i, step=i, loss=8 * math.exp(-i / 100) + 2.2, perplexity=13.5))
            events.append(P.CheckpointSaved(ts=T0 + i, step=i, path=f"checkpoint_{i:06d}",
                                            display_name=f"{model}_checkpoint_{i}_run_{run}", bytes=21_000_000,
                                            seconds=0.4))
    if finished:
        events.append(P.Finished(ts=T0 + steps + 1, step=steps, reason="completed", final_loss=events[-1].loss
                                 if isinstance(events[-1], P.Step) else None))
    return events


def write_log(layout: Layout, model: str, events: list[P.Event], run: int = 1) -> Path:
    layout.ensure()
    log = layout.run_log(model, run)
    log.write_text("".join(P.encode(e) + "\n" for e in events), encoding="utf-8")
    return log


def pretend_engine(layout: Layout, model: str, log: Path, run: int = 1) -> None:
    """An engine.json naming this very process: a live 'engine' whose log the test writes."""
    me = psutil.Process()
    layout.model_dir(model).mkdir(parents=True, exist_ok=True)
    layout.engine_pidfile(model).write_text(json.dumps({
        "model": model, "pid": me.pid, "create_time": me.create_time(), "run": run, "log": str(log),
        "started": T0, "host": "test",
    }))


def checkpoint_entry(model: str, step: int, **kw: Any) -> SimpleNamespace:
    values = dict(
        model=model, step=step, run=1, display_name=f"{model}_checkpoint_{step}_run_1",
        path=f"/data/checkpoints/{model}/checkpoint_{step:06d}", loss=8 * math.exp(-step / 100) + 2.0,
        eval_loss=None, kept_eval=None, saved_at=T0 + step * 60, dataset="Stdlib", sequences=8000, size_bytes=21_000_000 + step,
        valid=True, reason=None, is_latest=False, running=False, is_best=False,
    )
    values.update(kw)
    return SimpleNamespace(**values)


def fake_catalog(checkpoints: list[Any] | None = None, runs: list[Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(list_checkpoints=lambda layout: list(checkpoints or []),
                           list_runs=lambda layout: list(runs or []))


# --- the real engine --------------------------------------------------------------------------------


def engine_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, PACKTRAIN_HOME=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_engine(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "engine", "--root", str(root), *args], cwd=REPO,
                          env=engine_env(root), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"packtrain-engine {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_corpus(folder: Path, n_files: int, start: int = 0) -> Path:
    """Small text files of varied, learnable prose; `start` adds new files to grow a dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "the model reads packed tokens and learns to predict the next one from the cache".split()
    for i in range(start, start + n_files):
        body = " ".join(words[(i + j) % len(words)] for j in range(60 + i % 40))
        (folder / f"doc_{i:05d}.txt").write_text(f"Document {i}. {body}.\n", encoding="utf-8")
    return folder
