"""The TUI's promises that need no engine: import-light startup, bounded memory, coalesced updates."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from app_testkit import REPO, fake_events, fake_step, form_app, screen_text, wait_for, write_log
from textual.app import App

from app import engine_client
from app.app import EngineUpdate, PacktrainApp
from app.engine_client import CONSOLE_MARK, EngineGone, EngineHandle, tail_events
from app.screens.cache import CacheJob, CacheScreen
from app.run_state import CURVE_POINTS, LOG_LINES, SPARK_POINTS, DownsampledSeries, RunState
from engine import protocol as P
from engine.paths import Layout

HEAVY = ("torch", "transformers", "datasets", "tokenizers", "mlx", "mlx_lm", "peft", "engine.cli")


def test_importing_the_app_loads_no_ml_library() -> None:
    """At run time too (tests/test_layers.py checks the source): `packtrain --help` starts fast."""
    code = (
        "import sys, app.main, app.app\n"
        "from app.app import PacktrainApp\n"
        "app.main.build_parser().format_help()\n"
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
        *growth(500, 750),
        P.State(state="paused"),
    ])
    assert state.status == "paused" and state.total_steps == 500 and state.expanded is not None
    state.apply([P.Error(message="out of memory", detail="Traceback\n  boom"),
                 P.Finished(step=101, reason="error")])
    assert state.status == "error" and state.error == "out of memory" and state.error_lines == ["Traceback", "  boom"]
    assert not state.active


def growth(total_before: int, total_after: int) -> list[P.Event]:
    """The events the engine writes when the cache grows under a run (Trainer.replan), in order."""
    said = [P.Log(message=P.growth_line(4000, 6000))]
    if total_after != total_before:
        said.append(P.Log(message=f"Using dynamic total steps: {total_after:,} (was {total_before:,})"))
    return [*said, P.CacheExpanded(step=101, n_before=4000, n_after=6000, total_steps_before=total_before,
                                   total_steps_after=total_after),
            P.Plan(total_steps=total_after, warmup_steps=10, n_sequences=6000, global_batch=8, tokens_per_step=256,
                   previous_total_steps=total_before)]


@pytest.mark.parametrize(("before", "after"), [(500, 750), (500, 500)])
def test_growth_is_told_once_and_an_unchanged_total_has_no_was(before: int, after: int) -> None:
    state = RunState(model="m")
    state.apply(growth(before, after))
    logs = list(state.logs)
    assert logs[0] == "Dataset expanded: 4,000 → 6,000 sequences"
    assert sum("Using dynamic total steps" in line for line in logs) == (before != after)
    assert sum("(was " in line for line in logs) == 2 * (before != after)  # the engine's line and the plan's
    assert logs[-1].startswith(f"Plan: {after:,} steps" + (f" (was {before:,})," if before != after else ","))


def test_the_terminal_and_the_log_pane_word_events_alike() -> None:
    """One wording (protocol.describe): the engine prints it, the dashboard's log pane shows it.
    Only errors differ: the CLI prints those once itself, on stderr."""
    from engine.run_log import human

    events = [*fake_events("m", steps=100, finished=True), *growth(500, 750), P.State(state="paused", reason="requested"),
              P.Warning(message="slow disk"), P.Log(message="hot", level="warning"), P.Error(message="boom")]
    state = RunState(model="m")
    state.apply(events)
    terminal = [line for line in map(human, events) if line is not None]
    assert list(state.logs) == [*terminal, "error: boom"]
    assert "Saved m_checkpoint_100_run_1 (20.0 MiB in 0.4s)" in terminal
    assert {"Paused (requested)", "warning: slow disk", "warning: hot"} <= set(terminal)


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
    from app.screens.config_form import ConfigFormScreen
    from engine.config import RunConfig

    (tmp_path / "a_file").write_text("x")
    app = form_app(Layout(tmp_path / "a_file" / "root"), RunConfig(name="m"))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        app.screen.action_submit()
        await pilot.pause()
        assert isinstance(app.screen, ConfigFormScreen)
        status = app.screen.query_one("#form-status")
        assert str(status.content) == f"✗ cannot save the config in {tmp_path / 'a_file' / 'root' / 'checkpoints' / 'm'}: Not a directory"
        await wait_for(pilot, lambda: "✗ cannot save the config in" in screen_text(app), 10, "the status in view")
        app.handle = EngineHandle(model="m")
        app.send_engine_command("save")  # the control folder cannot be made either: a notice, not a crash
        await pilot.pause()
        assert [n.message for n in app._notifications] == ["Could not send 'save' to the engine: Not a directory"]
    assert not (tmp_path / "a_file" / "root").exists()


class OneScreen(PacktrainApp):
    """The app with one screen pushed straight away: no environment probe first."""

    CSS_PATH = REPO / "app" / "app.tcss"

    def __init__(self, layout: Layout, screen: Any) -> None:
        super().__init__(layout)
        self.first = screen

    def on_mount(self, event: Any) -> None:
        event.prevent_default()
        self.push_screen(self.first)


@pytest.fixture
def no_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every engine command fails to start (OSError from exec): a missing interpreter."""
    missing = tmp_path / "no-such-python"
    monkeypatch.setattr(engine_client, "engine_argv", lambda layout, *args: [str(missing), "-m", "engine", *args])
    return missing


async def test_an_engine_that_cannot_start_leaves_the_cache_screen_usable(tmp_path: Path, no_engine: Path) -> None:
    """It used to stay on "Working..." forever; now it says why and takes Esc (and R, retry) again."""
    job = CacheJob(model="m", dataset="d", path=tmp_path / "cache", engine_args=["train"], build_args=["cache", "build"])
    app = OneScreen(Layout(tmp_path), CacheScreen(job))
    async with app.run_test(size=(250, 30)) as pilot:
        await wait_for(pilot, lambda: "R retries" in screen_text(app), 20, "the failure")
        text = " ".join(screen_text(app).split())
        assert f"✗ could not start the engine: No such file or directory: {no_engine}" in text
        assert "Working..." not in text and not app._notifications
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, CacheScreen)


async def test_the_cache_screen_shows_the_format_examples_and_trained_share(tmp_path: Path) -> None:
    job = CacheJob(model="m", dataset="d", path=tmp_path / "gone", engine_args=["train"])
    app = OneScreen(Layout(tmp_path), CacheScreen(job))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: "gone" in screen_text(app), 20, "the cache screen")
        app.screen._report(P.CacheReady(cache="c", chunks=6, sequences=293, format="chat", examples=300,
                                        trained_share=0.275), built=True)
        await pilot.pause()
        assert "chat: 300 examples, 27.5% of tokens train" in screen_text(app)
        app.screen._report(P.CacheReady(cache="c", chunks=6, sequences=293, examples=40), built=False)
        await pilot.pause()
        assert "text: 40 documents" in screen_text(app)


async def test_every_screen_reports_a_failed_worker(tmp_path: Path, no_engine: Path) -> None:
    """The environment checks fail with the reason; a screen without a place of its own (and the
    app) get a notification; the manage screen shows it under the list."""
    from app.screens.environment import EnvironmentScreen
    from app.screens.manage import ManageScreen
    from app.workers import ReportsWorkerFailures

    app = OneScreen(Layout(tmp_path), EnvironmentScreen())
    async with app.run_test(size=(250, 30)) as pilot:
        await wait_for(pilot, lambda: "[ FAILED " in screen_text(app), 20, "the environment failure")
        assert f"could not start the engine: No such file or directory: {no_engine}" in screen_text(app)
        assert "could not report its environment. Enter continues." in screen_text(app)
        manage = ManageScreen()
        app.push_screen(manage)
        await pilot.pause()
        manage.delete(["x"])
        await wait_for(pilot, lambda: "✗ could not start the engine" in screen_text(app), 20, "the delete failure")
        assert isinstance(app, ReportsWorkerFailures) and not app._notifications

        async def boom() -> None:
            raise RuntimeError("a bug")

        app.run_worker(boom(), exit_on_error=False)
        await wait_for(pilot, lambda: app._notifications, 20, "the notification")
        assert [n.message for n in app._notifications] == ["RuntimeError: a bug"]


async def test_a_log_that_cannot_be_followed_fails_the_run_instead_of_freezing(tmp_path: Path, no_engine: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from app.screens.environment import EnvironmentScreen

    log = tmp_path / "training_logs" / "m_run_1.jsonl"

    async def unreadable(layout: Layout, handle: EngineHandle, poll: float = 0.25) -> Any:
        raise PermissionError(13, "Permission denied", str(log))
        yield

    monkeypatch.setattr(engine_client, "tail_events", unreadable)
    app = OneScreen(Layout(tmp_path), EnvironmentScreen())
    async with app.run_test(size=(120, 30)) as pilot:
        app._watch(EngineHandle(model="m"))
        await wait_for(pilot, lambda: app.run_state is not None and app.run_state.status == "error", 20, "the failure")
        assert app.run_state.error == f"cannot follow the engine: Permission denied: {log}"
        await wait_for(pilot, lambda: "The engine stopped with an error" in screen_text(app), 20, "the dashboard")


def test_environment_names_the_backend_and_its_libraries() -> None:
    from app.screens.environment import engine_checks

    checks = engine_checks({"backend": "mlx", "backend_reason": "auto: Apple Silicon with mlx-lm installed",
                            "device": "gpu", "device_name": "Apple arm64 (Metal)", "mlx": "0.32.4", "mlx_lm": "0.32.2"})
    assert checks["backend"] == "mlx (auto: Apple Silicon with mlx-lm installed)"
    assert checks["libs"] == "mlx 0.32.4, mlx-lm 0.32.2" and checks["device"] == "GPU (Apple arm64 (Metal))"


def test_the_dashboard_shows_oom_fallbacks_and_rollbacks_in_its_panel_and_log() -> None:
    from app.screens.dashboard import plan_text

    state = RunState(model="m")
    fallback = P.OomFallback(step=3, micro_batch=2, grad_accum=4, grad_checkpointing=False,
                             message="Out of memory at step 4 with micro_batch 4 x grad_accum 2, gradient checkpointing "
                                     "off: micro-batch 4 -> 2, gradient accumulation 2 -> 4 (same global batch)")
    rollback = P.DivergenceRollback(step=9, to_step=6, skipped=3, lr_scale=0.5,
                                    message="Diverged: 3 non-finite steps in a row up to step 9; rolled back to step "
                                            "6, LR x0.5 from now on")
    state.apply([fallback, rollback])
    panel = plan_text(state).splitlines()
    assert "OOM   micro 2 x accum 4" in panel and "NaN   back to 6 · LR x0.5" in panel
    assert list(state.logs) == [fallback.message, rollback.message]
