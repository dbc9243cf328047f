"""Pilot tests of the TUI driving a REAL engine process: tiny model, tiny cache, all in tmp_path.

Each test goes through the screens with key presses, exactly as a person would, and checks both
what the screen says and what the engine left on disk.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Static
from app_testkit import make_corpus, pretend_engine, run_engine, screen_text, wait_for

from app.app import PacktrainApp
from app.screens.cache import CacheScreen
from app.screens.checkpoints import CheckpointsScreen
from app.screens.config_form import ConfigFormScreen
from app.screens.dashboard import DashboardScreen
from app.screens.extend import ExtendScreen
from app.screens.manage import ManageScreen
from app.screens.modals import ConfirmScreen, QuitScreen
from app.screens.naming import NamingScreen
from app.screens.runs import RunsScreen
from engine import control
from engine.catalog import list_runs
from engine.config import RunConfig
from engine.paths import Layout

pytestmark = pytest.mark.slow
SIZE = (100, 30)


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Layout]:
    root = tmp_path / "root"
    for key, value in {"PACKTRAIN_HOME": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    layout = Layout(root)
    yield layout
    for info in control.live_engines(layout):  # engines these tests started and did not stop
        if info.pid != os.getpid():
            os.kill(info.pid, signal.SIGKILL)


def tiny(corpus: Path, name: str = "", **train: Any) -> RunConfig:
    data = {"source": str(corpus), "tokenizer": "bytes", "seq_len": 32, "docs_per_chunk": 20}
    data.update(train.pop("data", {}))
    settings = {"max_steps": 12, "log_interval": 1, "save_interval": 6, "micro_batch": 8, "eval_interval": 1000}
    settings.update(train)
    return RunConfig.from_dict({"name": name, "model": {"preset": "tiny"}, "data": data, "train": settings}).validate()


def cli_flags(cfg: RunConfig) -> list[str]:
    path = Path(cfg.data.source or "").parent / f"{cfg.name}.yaml"
    path.write_text(cfg.dump_yaml(), encoding="utf-8")
    return ["--config", str(path)]


def dashboard(app: PacktrainApp) -> DashboardScreen | None:
    return app.screen if isinstance(app.screen, DashboardScreen) else None


def step_of(app: PacktrainApp) -> int:
    screen = dashboard(app)
    return screen.state.step.step if screen and screen.state.step else 0


async def enter_home(pilot: Any) -> None:
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, CheckpointsScreen), 10, "the checkpoint list")


async def accept_defaults_until(pilot: Any, cache_text: str) -> None:
    """Home, N, then Enter on the suggested name and Enter on the form: the Enter-Enter path."""
    await enter_home(pilot)
    await pilot.press("n", "enter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfigFormScreen), 10, "the config form")
    await pilot.press("enter")
    await wait_for(pilot, lambda: cache_text in screen_text(pilot.app), 60, repr(cache_text))


def endless(corpus: Path, name: str) -> RunConfig:
    """A run that trains until told to stop (saving only when asked)."""
    return tiny(corpus, name, max_steps=100_000, save_interval=100_000)


async def start_training(pilot: Any) -> None:
    await accept_defaults_until(pilot, "Cache ready")
    await pilot.press("enter")
    await wait_for(pilot, lambda: step_of(pilot.app) >= 2, 90, "training to start")


async def test_environment_checks_complete_from_the_engine(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from engine.backends.torch_precision import machine_key, probe_shape

    # this machine's measurement, as an earlier run left it: the engine reads it instead of probing
    # the key names the thread count: the engine runs with OMP_NUM_THREADS=1, whatever this process has
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    layout.precision_cache.parent.mkdir(parents=True, exist_ok=True)
    layout.precision_cache.write_text(json.dumps({"format": 1, "entries": {
        machine_key("cpu", probe_shape(RunConfig())): {"fp32_ms": 30.0, "bf16_ms": 50.0, "error": None}}}))
    app = PacktrainApp(layout)
    async with app.run_test(size=(80, 24)) as pilot:
        assert "[CHECKING] Device" in screen_text(app)  # painted before the engine answered
        expected = ["All checks complete", "[COMPLETE] Backend: torch (auto: not Apple Silicon", "[COMPLETE] Device: CPU",
                    "[COMPLETE] bf16", "[COMPLETE] Precision: auto picks fp32: bf16 autocast ran 0.60x fp32",
                    "[COMPLETE] Libraries: torch 2.", "transformers", f"[COMPLETE] Data root: {str(layout.root)[:30]}"]
        # the answer re-lays the screen out (the reason line wraps): wait until one paint shows it all
        await wait_for(pilot, lambda: all(line in screen_text(app) for line in expected), 120, "engine info")
        await enter_home(pilot)
        assert "Press N to start a new training." in screen_text(app)


async def test_new_training_flow_end_to_end(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    app = PacktrainApp(layout, base_config=tiny(corpus, max_steps=40))
    async with app.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NamingScreen))
        suggestion = app.screen.suggestions[0]
        assert suggestion == "117K_Corpus_32"
        await pilot.press(*"bad/name")
        await wait_for(pilot, lambda: "✗ invalid model name 'bad/name'" in screen_text(app))
        await pilot.press("enter")
        assert isinstance(app.screen, NamingScreen)  # an invalid name does not go on
        await pilot.press("home", "ctrl+k", *"tui_run", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), what="the config form")

        form = app.screen
        await pilot.click("#f-data-seq_len")
        await pilot.press("home", "ctrl+k", "1", "enter")
        await wait_for(pilot, lambda: "data.seq_len must be at least 2" in screen_text(app))
        await pilot.press("home", "ctrl+k", *"32")
        await pilot.click("#f-train-max_steps")
        await pilot.press("home", "ctrl+k", *"16")
        form.query_one("#f-train-sample_every", Input).focus()  # below the fold: focus scrolls to it
        await pilot.press("home", "ctrl+k", "8")
        form.query_one("#f-train-sample_prompt", Input).focus()
        await pilot.press(*"the", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CacheScreen), what="the cache screen")
        saved = RunConfig.load(layout.model_dir("tui_run") / "config.yaml")
        assert saved.name == "tui_run" and saved.train.max_steps == 16 and saved.model.preset == "tiny"
        assert saved.train.sample_every == 8 and saved.train.sample_prompt == "the"
        assert form.collect().train.max_steps == 16

        await wait_for(pilot, lambda: "Building cache: corpus at" in screen_text(app), 10)
        await wait_for(pilot, lambda: "Cache ready: 10 chunks" in screen_text(app), 60, "the cache build")
        await pilot.press("enter")
        await wait_for(pilot, lambda: step_of(app) >= 1, 90, "the first step")
        first = step_of(app)
        await wait_for(pilot, lambda: step_of(app) > first, 60, "a later step")
        assert "Step " in screen_text(app) and "/16 (" in screen_text(app) and " tok/s | ETA " in screen_text(app)
        await wait_for(pilot, lambda: "Finished (completed) at step 16" in screen_text(app), 90, "the end")
        assert "Saved step 16 · " in screen_text(app) and "tui_run_checkpoint_16_run_1" in screen_text(app)
        samples = [e for e in map(json.loads, layout.run_log("tui_run", 1).read_text().splitlines())
                   if e["event"] == "sample"]
        assert [s["step"] for s in samples] == [8, 16] and samples[-1]["prompt"] == "the"
        shown = str(app.screen.query_one("#sample", Static).render())  # the newest sample, under the plot
        assert shown == "Sample at step 16\nthe" + samples[-1]["text"]

        await pilot.press("escape")
        await wait_for(pilot, lambda: "tui_run_checkpoint_16_run_1" in screen_text(app), 10, "the new checkpoint")
        assert (layout.model_dir("tui_run") / "checkpoint_000016" / "MANIFEST.json").is_file()

        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen))
        await wait_for(pilot, lambda: "tui_run run 1: steps 0 → 16 of 16" in screen_text(app), 10, "the run summary")
        text = screen_text(app)
        assert "finished: completed" in text and "Throughput (tok/s)" in text and "Memory (GB)" in text


async def test_detach_then_reattach_from_a_new_app(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    app = PacktrainApp(layout, base_config=endless(corpus, "long_run"))
    async with app.run_test(size=SIZE) as pilot:
        await start_training(pilot)
        model = dashboard(app).state.model

        await pilot.press("p")
        await wait_for(pilot, lambda: "[PAUSED]" in screen_text(app), 30, "the pause")
        paused_at = step_of(app)
        await pilot.pause(1.0)
        assert step_of(app) == paused_at
        await pilot.press("p")
        await wait_for(pilot, lambda: step_of(app) > paused_at, 30, "the resume")
        await pilot.press("s")
        await wait_for(pilot, lambda: dashboard(app).state.last_checkpoint is not None, 30, "the save")

        await pilot.press("d")
        await wait_for(pilot, lambda: "running: attach" in screen_text(app), 10, "the running marker")
        detached_at = step_of_log(layout, model)
        await pilot.press("q")  # detached: quitting asks nothing
    engine = control.live_engine(layout, model)
    assert engine is not None, "the engine died with the TUI"

    app2 = PacktrainApp(layout)
    async with app2.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await wait_for(pilot, lambda: "running: attach" in screen_text(app2), 10)
        await pilot.press("enter")
        await wait_for(pilot, lambda: step_of(app2) > detached_at, 60, "steps after re-attaching")
        assert dashboard(app2).state.started is not None  # the history came from the log

        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app2.screen, QuitScreen), 10, "the quit question")
        assert "Detach (d)" in screen_text(app2) and "Stop (s)" in screen_text(app2)
        await pilot.press("c")
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app2.screen, ConfirmScreen), 10, "the stop confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: "Finished (stopped)" in screen_text(app2), 60, "the stop")
        await pilot.press("escape")
        await wait_for(pilot, lambda: "running: attach" not in screen_text(app2) and
                       f"{model}_checkpoint_" in screen_text(app2), 10, "the final checkpoint")
    assert control.live_engine(layout, model) is None


def step_of_log(layout: Layout, model: str) -> int:
    runs = [r for r in list_runs(layout) if r.model == model]
    return runs[0].last_step or 0


async def test_resume_from_the_list_notices_the_grown_cache(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    cfg = tiny(corpus, "grower", max_steps=None, epoch_fraction=0.05, save_interval=1000,
               data={"max_docs": 100})
    run_engine(layout.root, "train", *cli_flags(cfg))
    before = run_engine(layout.root, "checkpoints", "list", "--json").stdout
    assert "grower_checkpoint_" in before
    run_engine(layout.root, "cache", "build", *cli_flags(cfg), "--max-docs", "200")

    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await wait_for(pilot, lambda: "grower_checkpoint_" in screen_text(app), 10)
        start_step = app.screen.entries[app.screen._current_key()].step
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CacheScreen))
        await wait_for(pilot, lambda: "Cache validated: 10 chunks" in screen_text(app), 60, "validation")
        assert "Validating cache: corpus at " in screen_text(app)
        notice = app.screen.query_one("#cache-notice").render()
        assert str(notice).startswith("Dataset expanded: ") and " → " in str(notice)
        await pilot.press("enter")
        await wait_for(pilot, lambda: dashboard(app) is not None and dashboard(app).state.started is not None, 90)
        state = dashboard(app).state
        assert state.started.start_step == start_step and state.started.resumed_from
        await wait_for(pilot, lambda: state.finished is not None, 90, "the resumed run to finish")
        assert state.finished.reason == "completed" and state.finished.step > start_step
        assert state.expanded is not None and state.expanded.n_after > state.expanded.n_before
        assert f"Dataset expanded: {state.expanded.n_before:,} → {state.expanded.n_after:,} sequences" in str(notice)
        assert "Dataset expanded: " in screen_text(app)  # the dashboard's plan panel says it too


async def test_extend_a_finished_run_from_the_list(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    run_engine(layout.root, "train", *cli_flags(tiny(corpus, "extender", max_steps=6, save_interval=6)))
    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await wait_for(pilot, lambda: "extender_checkpoint_6_run_1" in screen_text(app), 10)
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, ExtendScreen))
        assert "It is at step 6 of 6" in screen_text(app)
        await pilot.press(*"10", "enter")
        await wait_for(pilot, lambda: dashboard(app) is not None and dashboard(app).state.finished is not None, 120,
                       "the extended run to finish")
        state = dashboard(app).state
        assert state.started.start_step == 6 and state.started.resumed_from == "extender_checkpoint_6_run_1"
        assert state.finished.reason == "completed" and state.finished.step == 10
        await wait_for(pilot, lambda: "Finished (completed) at step 10" in screen_text(app), 10, "the finish painted")
    assert layout.checkpoint_dir("extender", 10).is_dir()


async def test_delete_with_confirm_and_cancel(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    cfg = tiny(corpus, "deleter", max_steps=15, save_interval=5)
    run_engine(layout.root, "train", *cli_flags(cfg))
    oldest, latest = layout.checkpoint_dir("deleter", 5), layout.checkpoint_dir("deleter", 15)
    assert oldest.is_dir() and latest.is_dir()

    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ManageScreen))
        assert screen_text(app).index("deleter_checkpoint_5_") < screen_text(app).index("deleter_checkpoint_15_")
        await pilot.press("space")
        await wait_for(pilot, lambda: "Selected: 1 checkpoint(s)" in screen_text(app))
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Delete 1 checkpoint(s)" in screen_text(app) and "deleter_checkpoint_5_run_1" in screen_text(app)
        await pilot.press("n")
        await pilot.pause(0.5)
        assert oldest.is_dir(), "cancel deleted the checkpoint"

        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not oldest.exists(), 30, "the deletion")
        await wait_for(pilot, lambda: "Deleted deleter_checkpoint_5_run_1" in screen_text(app), 10, "the report")
        assert sorted(c.step for c in app.screen.entries.values()) == [10, 15]

        pretend_engine(layout, "deleter", layout.run_log("deleter", 1))  # now a "live engine" trains it
        manage = app.screen
        manage.reload()
        await pilot.pause()
        await pilot.press("end", "space", "d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: "refusing to delete" in screen_text(app), 30, "the engine's refusal")
        assert latest.is_dir()


async def test_engine_error_is_shown_with_its_message(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    cfg = tiny(corpus, data={"docs_per_chunk": 1000})  # one chunk, and it is held out for evaluation
    refused = run_engine(layout.root, "train", *cli_flags(tiny(corpus, "cli_twin", data={"docs_per_chunk": 1000})),
                         check=False)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()[-1].removeprefix("error: ")
    app = PacktrainApp(layout, base_config=cfg)
    async with app.run_test(size=SIZE) as pilot:
        await accept_defaults_until(pilot, "Cache validated: 1 chunks")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Engine error:" in screen_text(app), 90, "the error panel")
        assert dashboard(app).state.error == message  # the engine's own words, as the CLI prints them
        assert "The engine stopped with an error" in screen_text(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, CheckpointsScreen))


async def test_killed_engine_is_reported_not_frozen(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    app = PacktrainApp(layout, base_config=endless(corpus, "victim"))
    async with app.run_test(size=SIZE) as pilot:
        await start_training(pilot)
        os.kill(app.handle.pid, signal.SIGKILL)
        await wait_for(pilot, lambda: "Engine error:" in screen_text(app), 30, "the error panel")
        assert "ended unexpectedly" in screen_text(app) and "Step " in screen_text(app)


async def test_bad_cache_chunk_is_named_and_repaired(layout: Layout, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 200)
    cfg = tiny(corpus)
    run_engine(layout.root, "cache", "build", *cli_flags(cfg))
    chunk = next((layout.cache_dir(32, "corpus")).glob("packed_chunk_000003.lz4"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)

    app = PacktrainApp(layout, base_config=cfg)
    async with app.run_test(size=SIZE) as pilot:
        await accept_defaults_until(pilot, "✗ 1 bad chunk(s)")
        assert "chunk 3:" in screen_text(app) and "R repairs exactly these chunks" in screen_text(app)
        await pilot.press("enter")
        assert isinstance(app.screen, CacheScreen)  # a bad cache does not start training
        await pilot.press("r")
        await wait_for(pilot, lambda: "Cache validated: 10 chunks" in screen_text(app), 60, "the repair")


async def test_fine_tune_a_pretrained_folder_with_lora_from_the_form(layout: Layout, tmp_path: Path) -> None:
    from textual.widgets import Input, Select

    from app.formatting import format_params
    from app.screens.dashboard import plan_text
    from pretrained_support import save_tiny_pretrained

    model = save_tiny_pretrained(tmp_path / "pretrained", "llama")
    corpus = make_corpus(tmp_path / "corpus", 200)
    app = PacktrainApp(layout, base_config=tiny(corpus, max_steps=6))
    async with app.run_test(size=SIZE) as pilot:
        await enter_home(pilot)
        await pilot.press("n", "home", "ctrl+k", *"ft_run", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), what="the config form")
        form = app.screen
        assert not form.query_one("#row-f-model-init_from").display  # from scratch until chosen
        form.query_one("#start-kind", Select).value = "pretrained"
        await wait_for(pilot, lambda: form.query_one("#row-f-model-init_from").display)
        assert not form.query_one("#row-f-model-preset").display and not form.query_one("#row-f-model-lora_rank").display
        assert form.query_one("#f-train-lr", Input).value == "2e-05"  # the full fine-tune default
        form.query_one("#f-model-method", Select).value = "lora"
        await wait_for(pilot, lambda: form.query_one("#row-f-model-lora_rank").display)
        assert form.query_one("#f-train-lr", Input).value == "0.0002"
        await pilot.click("#f-model-init_from")
        await pilot.press(*str(model), "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CacheScreen), what="the cache screen")
        saved = RunConfig.load(layout.model_dir("ft_run") / "config.yaml")
        assert (saved.model.init_from, saved.model.method, saved.data.tokenizer) == (str(model), "lora", str(model))
        await wait_for(pilot, lambda: "Cache ready" in screen_text(app), 60, "the cache build")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Finished (completed) at step 6" in screen_text(app), 120, "the end")
        plan = app.screen.state.plan
        assert plan is not None and 0 < plan.n_trainable < plan.n_params
        assert (f"Train {format_params(plan.n_trainable)} of {format_params(plan.n_params)} params"
                in plan_text(app.screen.state))
    assert (layout.model_dir("ft_run") / "checkpoint_000006" / "base_model.json").is_file()
