"""The TUI's operating keys, through Pilot on fake checkpoints (no engine): `D` deletes on the manage
screen as its hint says, `t`/`+` extends a run from the checkpoint list, and the config form's
smart-warmup and growth-check fields reach the run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from app_testkit import checkpoint_entry, fake_catalog, pretend_engine, screen_text, wait_for

import app.screens.environment as environment
from app.app import PacktrainApp
from app.screens.checkpoints import CheckpointsScreen
from app.screens.config_form import ConfigFormScreen
from app.screens.extend import ExtendScreen
from app.screens.manage import ManageScreen
from app.screens.modals import ConfirmScreen
from engine.paths import Layout

SIZE = (100, 30)


@pytest.fixture(autouse=True)
def no_engine_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    async def info(layout: Layout, *args: str) -> dict[str, Any]:
        return {"device": "cpu", "device_name": "Test CPU", "bf16": False, "torch": "2", "transformers": "5"}

    monkeypatch.setattr(environment, "run_json", info)


def finished_checkpoint(tmp_path: Path, model: str, step: int, **kw: Any) -> Any:
    """A catalog entry whose folder holds the trainer_state.json the extend dialog reads."""
    folder = tmp_path / "checkpoints" / model / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": step}))
    return checkpoint_entry(model, step, path=str(folder), is_latest=True, **kw)


class Started:
    """Stands in for App.start_engine: records what would be spawned."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, model: str, *args: str) -> None:
        self.calls.append((model, *args))


async def home(pilot: Any) -> None:
    await wait_for(pilot, lambda: "All checks complete" in screen_text(pilot.app), 20, "the checks")
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, CheckpointsScreen), 10, "the checkpoint list")


@pytest.mark.parametrize("key", ["D", "d"])
async def test_manage_deletes_with_the_key_its_hint_names(tmp_path: Path, key: str) -> None:
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog([checkpoint_entry("m", 100), checkpoint_entry("m", 200)]))
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ManageScreen))
        assert "D deletes the selection" in screen_text(app)
        await pilot.press("space", key)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 5, f"{key} to ask for confirmation")
        assert "Delete 1 checkpoint(s)" in screen_text(app) and "m_checkpoint_100_run_1" in screen_text(app)
        await pilot.press("n")


@pytest.mark.parametrize(("key", "typed", "expected"), [
    ("t", {"steps": "1500"}, ["--max-steps", "1500"]),
    ("plus", {"epochs": "2.5"}, ["--epochs", "2.5", "--max-steps", "none", "--max-tokens", "none"]),
    ("t", {"steps": "1200", "epochs": "3"}, ["--max-steps", "1200", "--epochs", "3.0"]),
])
async def test_extend_a_finished_run_from_the_list(tmp_path: Path, key: str, typed: dict[str, str],
                                                   expected: list[str]) -> None:
    entry = finished_checkpoint(tmp_path, "done", 900)
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog([entry]))
    app.start_engine = started = Started()  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await pilot.press(key)
        await wait_for(pilot, lambda: isinstance(app.screen, ExtendScreen), 5, "the extend dialog")
        assert "It is at step 900 of 900" in screen_text(app)
        await pilot.press(*"900", "enter")
        await wait_for(pilot, lambda: "give more steps than that" in screen_text(app), 5, "the refusal")
        assert started.calls == []
        await pilot.press("home", "ctrl+k", *typed.get("steps", ""))
        if "epochs" in typed:
            await pilot.click("#extend-epochs")
            await pilot.press(*typed["epochs"])
        await pilot.press("enter")
        await wait_for(pilot, lambda: started.calls, 5, "the engine start")
    assert started.calls == [("done", "resume", entry.path, *expected)]


async def test_extend_is_refused_for_a_live_or_invalid_checkpoint_and_can_be_cancelled(tmp_path: Path) -> None:
    entries = [finished_checkpoint(tmp_path, "good", 50), checkpoint_entry("torn", 40, valid=False, reason="torn")]
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog(entries))
    app.start_engine = started = Started()  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, ExtendScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, CheckpointsScreen))
        await pilot.press("down", "t")
        await pilot.pause(0.3)
        pretend_engine(Layout(tmp_path), "good", Layout(tmp_path).run_log("good", 1))  # now an engine trains it
        app.screen.reload()
        await pilot.press("up", "t")
        await pilot.pause(0.3)
        assert isinstance(app.screen, CheckpointsScreen)
        assert [n.message for n in app._notifications] == [
            "torn_checkpoint_40_run_1 is not valid: torn", "An engine is training good; Enter attaches to it."]
    assert started.calls == []


async def test_home_help_names_the_extend_key(tmp_path: Path) -> None:
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog([finished_checkpoint(tmp_path, "done", 9)]))
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        assert "t Extend" in screen_text(app)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: "t or +" in screen_text(app))
        assert "train the highlighted checkpoint's run longer" in screen_text(app)


async def test_config_form_sets_smart_warmup_and_the_growth_check(tmp_path: Path) -> None:
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog())
    app.open_cache_for_new = opened = Started()  # type: ignore[method-assign]  # the cache step would spawn a build
    async with app.run_test(size=(100, 50)) as pilot:
        await home(pilot)
        await pilot.press("n", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), 10, "the config form")
        form = app.screen
        text = screen_text(app)
        assert "Full dataset (seqs)" in text and "Growth check every" in text
        cfg = form.collect()
        assert cfg.train.estimated_total_sequences is None and cfg.train.growth_check_interval == 0

        await pilot.click("#f-train-estimated_total_sequences")
        await pilot.press(*"250000")
        await pilot.click("#f-train-growth_check_interval")
        await pilot.press("home", "ctrl+k", *"-5", "enter")
        await wait_for(pilot, lambda: "train.growth_check_interval must be >= 0" in screen_text(app), 5)
        await pilot.press("home", "ctrl+k", *"50")
        cfg = form.collect()
        assert cfg.train.estimated_total_sequences == 250_000 and cfg.train.growth_check_interval == 50
        await pilot.press("enter")
        await wait_for(pilot, lambda: opened.calls, 10, "the form to go on")
    assert opened.calls[0][0] == cfg
    saved = Layout(tmp_path).config_yaml(cfg.name).read_text()
    assert "estimated_total_sequences: 250000" in saved and "growth_check_interval: 50" in saved
