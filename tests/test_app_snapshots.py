"""Deterministic text snapshots of the main screens: fixed size, no animation, frozen data and clock.

The screens read fixed fake data (a catalog stand-in and event logs with fixed timestamps, TZ=UTC),
so a change in what a screen shows is a diff in tests/snapshots/*.txt. Regenerate deliberately
with PACKTRAIN_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from app_testkit import (
    checkpoint_entry, fake_catalog, fake_events, pretend_engine, screen_text, wait_for, write_log,
)

import app.screens.environment as environment
from app.app import PacktrainApp
from app.screens.dashboard import DashboardScreen
from engine.paths import Layout

SNAPSHOTS = Path(__file__).parent / "snapshots"
INFO = {
    "backend": "torch", "backend_reason": "auto: not Apple Silicon, this is Linux x86_64",
    "device": "cpu", "device_name": "Test CPU", "bf16": True, "ram_total_gb": 24.0, "ram_available_gb": 20.0,
    "vram_gb": None, "cpu_count": 2, "torch": "2.13.0", "transformers": "5.23.0", "python": "3.11.7",
    "root": "/data", "disk_free_gb": 100.0, "precision": "fp32",
    "precision_reason": "bf16 autocast ran 0.37x fp32 (fp32 32.1 ms, bf16 85.7 ms for one layer, d256 ffn688 "
                        "heads 4/4 seq 256 x 2 rows; bf16 needs 1.10x), measured earlier on cpu, for the default config",
}


@pytest.fixture(autouse=True)
def frozen(monkeypatch: pytest.MonkeyPatch) -> Any:
    """UTC clock, and fixed machine facts instead of this machine's free RAM and disk."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()

    async def fake_info(layout: Layout, *args: str) -> dict[str, Any]:
        return dict(INFO)

    monkeypatch.setattr(environment, "run_json", fake_info)
    monkeypatch.setattr(environment, "local_checks", lambda root: {
        "python": "3.11.7", "ram": "20.0 GiB free of 24.0 GiB", "root": "/data (100.0 GiB free)"})
    yield
    monkeypatch.undo()
    time.tzset()


def render(app: PacktrainApp, keys: Sequence[str] = (), size: tuple[int, int] = (80, 24),
           ready: Callable[[PacktrainApp], Any] | None = None) -> str:
    async def go() -> str:
        async with app.run_test(size=size) as pilot:
            app.animation_level = "none"
            await pilot.pause()
            for key in keys:
                await pilot.press(key)
                await pilot.pause()
            if ready is not None:
                await wait_for(pilot, lambda: ready(app), timeout=20)
            await pilot.pause()
            return screen_text(app)

    return asyncio.run(go())


def assert_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("PACKTRAIN_UPDATE_SNAPSHOTS"):
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {path.name}; run with PACKTRAIN_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed:\n{text}"


def checkpoints() -> list[Any]:
    return [
        checkpoint_entry("25M_Stdlib_512", 900, is_latest=True),
        checkpoint_entry("25M_Stdlib_512", 600),
        checkpoint_entry("5M_Stdlib_256", 300, valid=False, reason="MANIFEST.json is missing"),
        checkpoint_entry("5M_Stdlib_256", 200),
    ]


def test_environment_snapshot(tmp_path: Path) -> None:
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog())
    text = render(app, ready=lambda a: "All checks complete" in screen_text(a))
    assert "[COMPLETE] Device: CPU (Test CPU)" in text
    assert_snapshot("environment_80x24", text)


def test_home_snapshot(tmp_path: Path) -> None:
    app = PacktrainApp(Layout(tmp_path), catalog=fake_catalog(checkpoints()))
    assert_snapshot("home_80x24", render(app, ["enter"]))


def test_home_empty_snapshot(tmp_path: Path) -> None:
    text = render(PacktrainApp(Layout(tmp_path), catalog=fake_catalog()), ["enter"])
    assert "Press N to start a new training." in text
    assert_snapshot("home_empty_80x24", text)


def test_naming_snapshot(tmp_path: Path) -> None:
    text = render(PacktrainApp(Layout(tmp_path), catalog=fake_catalog()), ["enter", "n"])
    assert "5M_Stdlib_256" in text
    assert_snapshot("naming_80x24", text)


def test_config_form_snapshot(tmp_path: Path) -> None:
    text = render(PacktrainApp(Layout(tmp_path), catalog=fake_catalog()), ["enter", "n", "enter"])
    assert_snapshot("config_form_80x24", text)


def test_manage_snapshot(tmp_path: Path) -> None:
    text = render(PacktrainApp(Layout(tmp_path), catalog=fake_catalog(checkpoints())), ["enter", "x", "space", "down", "space"])
    assert "Selected: 2 checkpoint(s), 40.1 MiB" in text  # 2 x 21,000,000 bytes
    assert_snapshot("manage_80x24", text)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_dashboard_snapshot(tmp_path: Path, size: tuple[int, int]) -> None:
    layout = Layout(tmp_path)
    model = "5M_Stdlib_256"
    pretend_engine(layout, model, write_log(layout, model, fake_events(model, steps=300)))
    app = PacktrainApp(layout, catalog=fake_catalog())

    def drawn(a: PacktrainApp) -> bool:
        screen = a.screen
        return isinstance(screen, DashboardScreen) and screen.state.step is not None \
            and screen.state.step.step == 300 and screen._plotted == screen.state.version

    text = render(app, ["enter", "enter"], size=size, ready=drawn)
    assert "Step 300/1,000 (30.0%) | Loss 2.398 | 20,900 tok/s | ETA 23:20m" in text
    assert_snapshot(f"dashboard_{size[0]}x{size[1]}", text)


def test_runs_snapshot(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_log(layout, "5M_Stdlib_256", fake_events("5M_Stdlib_256", steps=300, finished=True))
    app = PacktrainApp(layout)  # the real catalog lists the log written above
    text = render(app, ["enter", "l"], ready=lambda a: "Final loss" in screen_text(a))
    assert "Final loss 2.398" in text and "completed" in text
    assert_snapshot("runs_80x24", text)
