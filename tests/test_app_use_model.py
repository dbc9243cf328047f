"""Pilot tests of using a trained model from the TUI, against REAL engine children: the Playground
(streaming and stop through a serve-model child), Evaluate (columns filled from kept results) and
Compare (one table, one sample per model). One tiny model is trained once for the module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
from app_testkit import screen_text, wait_for

from app.app import PacktrainApp
from app.screens.checkpoints import CheckpointsScreen
from app.screens.compare import CompareScreen
from app.screens.playground import PlaygroundScreen
from engine.paths import Layout
from tests.train_support import run_engine, train_flags, write_corpus

pytestmark = pytest.mark.slow
SIZE = (120, 36)
FIRST, LAST = "tiny_checkpoint_10_run_1", "tiny_checkpoint_20_run_1"
CONTEXT = 512


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny`, trained 20 steps on a byte-level cache, saved every 10, with a context of 512 bytes:
    room for a sample long enough that a stop lands in the middle of it."""
    root = tmp_path_factory.mktemp("tui-use")
    data = ["--source", str(write_corpus(root)), "--tokenizer", "bytes", "--seq-len", str(CONTEXT),
            "--docs-per-chunk", "40"]
    done = run_engine(root, "train", "--name", "tiny", *data, *train_flags(max_steps=20, save_interval=10))
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def layout(root: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    for key, value in {"PACKTRAIN_HOME": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    return Layout(root)


def serve_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "serve-model" in cmdline(p)]


def cmdline(proc: psutil.Process) -> list[str]:
    """A child that ended (a zombie not reaped yet, or gone) has no command line to read."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def ended(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def home(pilot: Any) -> CheckpointsScreen:
    await pilot.press("enter")
    return await wait_for(pilot, lambda: isinstance(pilot.app.screen, CheckpointsScreen) and pilot.app.screen,
                          30, "the checkpoint list")


async def highlight(pilot: Any, name: str) -> None:
    screen = pilot.app.screen
    await wait_for(pilot, lambda: any(e.display_name == name for e in screen.entries.values()), 10, name)
    while screen.entries.get(screen._current_key() or "") is None or \
            screen.entries[screen._current_key()].display_name != name:
        await pilot.press("down")


async def test_playground_streams_text_and_stop_ends_it(layout: Layout) -> None:
    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await highlight(pilot, LAST)
        await pilot.press("G")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, PlaygroundScreen) and app.screen, 10, "playground")
        await wait_for(pilot, lambda: screen.loaded, 60, "the model to load")
        child = serve_children()
        assert len(child) == 1

        screen.query_one("#f-temperature").value = "abc"
        await pilot.press("ctrl+g")
        assert "Temp must be a number, got 'abc'" in screen_text(app)
        screen.query_one("#f-temperature").value = "0"
        screen.query_one("#f-top_p").value = "2"
        await pilot.press("ctrl+g")
        assert "Top-p must be in (0, 1], got 2.0" in screen_text(app)
        screen.query_one("#f-top_p").value = ""

        await pilot.click("#prompt")
        await pilot.press(*"the ")
        screen.query_one("#f-max_new_tokens").value = "40"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: "Done (length): 40 tokens" in screen_text(app), 60, "a finished sample")
        assert len(screen.text) >= 20 and str(screen.query_one("#output").content) == screen.text

        screen.query_one("#f-max_new_tokens").value = str(CONTEXT - 8)
        # the action, not the key: Pilot.press waits for the app to go idle, here the end of the stream
        screen.action_generate()
        # the last sample's text stays until the new one starts: wait for the start first
        await wait_for(pilot, lambda: "Generating" in screen_text(app), 60, "the generation to start")
        await wait_for(pilot, lambda: len(screen.text) > 5, 60, "streamed text")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "Done (interrupted)" in screen_text(app), 60, "the stop")
        assert screen.request is None and 5 < len(screen.text) < CONTEXT - 8

        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, CheckpointsScreen), 10, "back home")
        await wait_for(pilot, lambda: ended(child[0]), 10, "the model server to end with its screen")


async def test_playground_child_ends_with_the_app(layout: Layout) -> None:
    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await pilot.press("g")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, PlaygroundScreen) and app.screen, 10, "playground")
        await wait_for(pilot, lambda: screen.loaded, 60, "the model to load")
        child = serve_children()
        assert len(child) == 1
    psutil.wait_procs(child, timeout=10)
    assert ended(child[0])


async def test_evaluate_fills_the_columns_for_marked_checkpoints(layout: Layout) -> None:
    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        screen = await home(pilot)
        assert all(e.kept_eval is None for e in screen.entries.values())
        await highlight(pilot, LAST)
        await pilot.press("space")
        await highlight(pilot, FIRST)
        await pilot.press("space")
        assert "* " + FIRST in screen_text(app) and "* " + LAST in screen_text(app)
        await pilot.press("E")
        await wait_for(pilot, lambda: "Evaluated 2 checkpoint(s)." in screen_text(app), 120, "both evals")
        shown = {e.display_name: e.kept_eval for e in screen.entries.values()}
        assert shown[FIRST] and shown[LAST] and shown[LAST]["loss"] < shown[FIRST]["loss"]
        table = screen.query_one("#checkpoints")
        for entry in screen.entries.values():
            row = table.get_row(f"ckpt:{entry.path}")
            assert row[4] == f"{entry.kept_eval['loss']:.3f}" and row[5] == f"{entry.kept_eval['bpb']:.3f}"


async def test_compare_shows_both_tables_rows_and_samples(layout: Layout) -> None:
    app = PacktrainApp(layout)
    async with app.run_test(size=SIZE) as pilot:
        await home(pilot)
        await pilot.press("C")
        await wait_for(pilot, lambda: "Mark (Space) two or more" in screen_text(app), 5, "the refusal")
        await highlight(pilot, LAST)
        await pilot.press("space")
        await highlight(pilot, FIRST)
        await pilot.press("space", "C")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen, 10, "compare")
        # the samples mount with the status line; one paint shows them all
        await wait_for(pilot, lambda: "seed 0" in screen_text(app) and screen_text(app).count("The") >= 3, 180,
                       "the comparison")
        table = screen.query_one("#compare-table")
        assert [table.get_row_at(i)[0] for i in range(table.row_count)] == [LAST, FIRST]
        assert len(screen.query(".sample")) == 2
