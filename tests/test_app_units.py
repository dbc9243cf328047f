"""The TUI's promises that need no engine: import-light startup, bounded memory, coalesced updates."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from app_testkit import REPO, fake_events, fake_step, write_log
from textual.app import App

from app.app import EngineUpdate
from app.engine_client import CONSOLE_MARK, EngineGone, EngineHandle, tail_events
from app.run_state import CURVE_POINTS, LOG_LINES, SPARK_POINTS, DownsampledSeries, RunState
from engine import protocol as P
from engine.paths import Layout

HEAVY = ("torch", "transformers", "datasets", "tokenizers")


def test_importing_the_app_loads_no_ml_library() -> None:
    code = (
        "import sys, app.main, app.app\n"
        "from app.app import PacktrainApp\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the TUI imported {out.stdout.strip()}"


def test_series_keeps_whole_run_at_fixed_capacity() -> None:
    series = DownsampledSeries(capacity=64)
    for step in range(1, 100_001):
        series.append(step, float(step))
    xs, ys = series.points()
    assert len(xs) <= 65 and series.stride >= 1024
    assert xs[0] <= 2 * series.stride and xs[-1] == 100_000  # still spans the run, newest included
    assert all(a < b for a, b in zip(xs, xs[1:]))
    assert abs(ys[len(ys) // 2] - xs[len(xs) // 2]) < series.stride  # averages stay on the curve


def test_a_long_run_keeps_run_state_memory_flat() -> None:
    state = RunState(model="m")
    batch = [fake_step(i, 1_000_000) for i in range(1, 1001)]

    def feed(rounds: int, start: int) -> None:
        for r in range(rounds):
            for i, e in enumerate(batch):
                e.step = start + r * 1000 + i + 1
            state.apply(batch)

    feed(20, 0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    feed(180, 20_000)
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert state.step is not None and state.step.step == 200_000 and len(state.logs) == LOG_LINES
    assert len(state.loss) <= CURVE_POINTS + 1 and len(state.tok_s) == SPARK_POINTS
    # 180,000 more steps: even 100 bytes each would be 18 MB; bounded histories stay well under 1 MB
    assert growth < 1 << 20, f"run state grew by {growth:,} bytes over 180,000 steps"


def test_fold_events_into_state() -> None:
    state = RunState(model="m")
    state.apply([
        P.RunStarted(model="m", run=2, start_step=100, total_steps=500, resumed_from="m_checkpoint_100_run_1"),
        P.Plan(total_steps=500, warmup_steps=10, n_sequences=4000, global_batch=8, tokens_per_step=256),
        fake_step(101, 500),
        P.CacheExpanded(step=101, n_before=4000, n_after=6000, total_steps_before=500, total_steps_after=750),
        P.State(state="paused"),
    ])
    assert state.status == "paused" and state.total_steps == 500 and state.expanded is not None
    assert "Using dynamic total steps: 750 (was 500)" in state.logs
    state.apply([P.Error(message="out of memory", detail="Traceback\n  boom"),
                 P.Finished(step=101, reason="error")])
    assert state.status == "error" and state.error == "out of memory" and state.error_lines == ["Traceback", "  boom"]
    assert not state.active


def test_a_diverged_run_and_a_foreign_log_fold_without_crashing() -> None:
    """NaN and inf arrive as null on the wire; a hand-edited log can hold anything. The dashboard
    that folds them must keep going: NaN shows as nan, ill-typed events as unknown lines."""
    wire = [
        P.Eval(step=5, loss=1.5, perplexity=4.5),
        P.Eval(step=10, loss=float("nan"), perplexity=float("inf")),
        P.Step(step=11, total_steps=20, loss=float("nan"), lr=1e-3, grad_norm=float("inf"), tokens_per_sec=10.0,
               eta_s=float("nan"), progress_pct=55.0, rss_gb=1.0),
    ]
    state = RunState(model="m")
    state.apply([P.decode(P.encode(e)) for e in wire])
    assert "Eval at step 10: loss nan, perplexity nan" in state.logs and state.best_eval == 1.5
    assert state.step is not None and state.step.eta_s is None and state.step.grad_norm != state.step.grad_norm
    forged = [{"event": "run", "model": "m", "run": "x", "start_step": "a"},
              {"event": "eval", "step": 12, "loss": "low", "perplexity": 1.0},
              {"event": "finished", "step": 12, "reason": 5}]
    state.apply([P.decode(json.dumps(d)) for d in forged])
    assert [line.startswith("(unknown event)") for line in list(state.logs)[-3:]] == [True, True, True]
    assert state.started is None and state.finished is None and state.step.step == 11


class Counter(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.handled = 0

    def on_engine_update(self, message: EngineUpdate) -> None:
        self.handled += 1


async def test_a_burst_of_updates_costs_a_handful_of_repaints() -> None:
    app = Counter()
    state = RunState()
    async with app.run_test() as pilot:
        for _ in range(5000):
            app.post_message(EngineUpdate(state))
        await pilot.pause()
        await pilot.pause()
    assert 1 <= app.handled < 10


async def test_an_engine_that_came_and_went_is_still_followed(tmp_path: Path) -> None:
    """A fast engine can take its lock, train and exit between two looks at engine.json; its run
    log (found by the pid in its first line) still tells the whole story."""
    layout = Layout(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    events = fake_events("quick", steps=5, total=5, finished=True)
    events[0].pid = proc.pid
    write_log(layout, "quick", events)
    handle = EngineHandle(model="quick", proc=proc)
    batches = [batch async for batch in tail_events(layout, handle, poll=0.01)]
    assert isinstance(batches[-1][-1], P.Finished) and sum(len(b) for b in batches) == len(events)


async def test_an_engine_that_refused_to_start_reports_its_error_line(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.ensure()
    console = tmp_path / "console.log"
    console.write_text(f"{CONSOLE_MARK}train old\nerror: an older failure\n{CONSOLE_MARK}train new\n"
                       "Traceback...\nerror: another engine is already training 'm' (pid 7)\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait()
    with pytest.raises(EngineGone, match=r"another engine is already training 'm' \(pid 7\)") as gone:
        async for _ in tail_events(layout, EngineHandle(model="m", proc=proc, console=console), poll=0.01):
            pass
    assert "error: an older failure" not in gone.value.lines


def test_a_root_under_a_file_is_refused_before_the_tui_starts(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from app.main import main

    (tmp_path / "a_file").write_text("x")
    assert main(["--root", str(tmp_path / "a_file" / "root")]) == 2
    assert capsys.readouterr().err == (f"error: cannot use {tmp_path / 'a_file' / 'root'} as the data root: "
                                       f"{tmp_path / 'a_file'} is a file, not a folder\n")


async def test_a_config_that_cannot_be_saved_is_a_status_line_not_a_crash(tmp_path: Path) -> None:
    """The form writes checkpoints/<name>/config.yaml; a root that refuses it must not kill the TUI."""
    from app.app import PacktrainApp
    from app.screens.config_form import ConfigFormScreen
    from app_testkit import screen_text
    from engine.config import RunConfig

    class FormOnly(PacktrainApp):
        CSS_PATH = REPO / "app" / "app.tcss"

        def on_mount(self, event: Any) -> None:  # straight to the form: no environment screen, no engine probe
            event.prevent_default()
            self.push_screen(ConfigFormScreen(RunConfig(name="m")))

    (tmp_path / "a_file").write_text("x")
    app = FormOnly(Layout(tmp_path / "a_file" / "root"))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        app.screen.action_submit()
        await pilot.pause()
        assert isinstance(app.screen, ConfigFormScreen)
        assert f"✗ cannot save the config in {tmp_path / 'a_file' / 'root' / 'checkpoints' / 'm'}: Not a directory" \
            in " ".join(screen_text(app).split())
        app.handle = EngineHandle(model="m")
        app.send_engine_command("save")  # the control folder cannot be made either: a notice, not a crash
        await pilot.pause()
        assert [n.message for n in app._notifications] == ["Could not send 'save' to the engine: Not a directory"]
    assert not (tmp_path / "a_file" / "root").exists()


def test_environment_names_the_backend_and_its_libraries() -> None:
    from app.screens.environment import engine_checks

    checks = engine_checks({"backend": "mlx", "backend_reason": "auto: Apple Silicon with mlx-lm installed",
                            "device": "gpu", "device_name": "Apple arm64 (Metal)", "mlx": "0.32.4", "mlx_lm": "0.32.2"})
    assert checks["backend"] == "mlx (auto: Apple Silicon with mlx-lm installed)"
    assert checks["libs"] == "mlx 0.32.4, mlx-lm 0.32.2" and checks["device"] == "GPU (Apple arm64 (Metal))"
