"""TUI under load: key press to repaint while a training engine saturates every core (Pilot).

A tiny run leaves a few checkpoints; then a real `packtrain-engine train` of the 5M preset runs in
the background with torch using every core. The TUI (in this process, headless) opens the
checkpoint list, which refreshes itself from disk meanwhile, and the bench presses Down and Up
there like a person, a few hundred ms apart. Each latency runs from the key press to the first
repaint whose table shows the moved cursor (the compositor's update handed to the terminal
driver: headless, nothing is written, so the terminal's own drawing is not included).

    python bench/tui_bench.py [--presses 40] [--preset 5M]

Prints the median and 90th percentile (goal: median < 100 ms) with the CPU load measured meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from textual.widgets import DataTable  # noqa: E402

from app.app import PacktrainApp  # noqa: E402
from app.screens.checkpoints import CheckpointsScreen  # noqa: E402
from engine.paths import Layout  # noqa: E402

SOURCE = str(Path(sysconfig.get_paths()["stdlib"]) / "email")  # ~380 KB of text: builds in seconds


def engine_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PACKTRAIN_HOME": str(root), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def data_flags(seq_len: int) -> list[str]:
    return ["--source", SOURCE, "--tokenizer", "bytes", "--seq-len", str(seq_len), "--docs-per-chunk", "4",
            "--device", "cpu", "--precision", "fp32"]


def checkpoints(root: Path) -> None:
    """A finished tiny run with a few checkpoints for the list to show."""
    subprocess.run(engine_cmd("train", "--name", "listed", "--preset", "tiny", *data_flags(64), "--micro-batch", "4",
                              "--max-steps", "6", "--save-interval", "2", "--keep-last", "3"),
                   env=env(root, OMP_NUM_THREADS="1"), cwd=REPO, check=True, capture_output=True)


def start_load(root: Path, preset: str) -> subprocess.Popen[str]:
    """An engine training `preset` on every core; returns once it reports its first step."""
    proc = subprocess.Popen(engine_cmd("train", "--name", "load", "--preset", preset, *data_flags(256),
                                       "--micro-batch", "8", "--max-steps", "100000", "--log-interval", "1",
                                       "--save-interval", "100000", "--events"),
                            env=env(root), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "step":
            return proc
    raise RuntimeError(f"the load engine exited with {proc.wait()} before its first step")


async def measure(layout: Layout, presses: int, gap_s: float) -> list[float]:
    app = PacktrainApp(layout)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("enter")
        while not isinstance(app.screen, CheckpointsScreen) or app.screen.query_one(DataTable).row_count < 2:
            await asyncio.sleep(0.05)
        table = app.screen.query_one(DataTable)
        shown: list[tuple[float, int]] = []  # (when, cursor row) of each repaint
        display = app._display

        def recorded(screen: Any, renderable: Any) -> None:
            display(screen, renderable)
            shown.append((time.perf_counter(), table.cursor_row))

        app._display = recorded  # type: ignore[method-assign]
        latencies = []
        for i in range(presses):
            key = "down" if table.cursor_row == 0 else "up"
            want = table.cursor_row + (1 if key == "down" else -1)
            seen = len(shown)
            started = time.perf_counter()
            await pilot.press(key)
            while not any(row == want for _, row in shown[seen:]):
                await asyncio.sleep(0.002)
            latencies.append(next(t for t, row in shown[seen:] if row == want) - started)
            await asyncio.sleep(gap_s)
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presses", type=int, default=40)
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between key presses")
    ap.add_argument("--preset", default="5M", help="the model the background engine trains")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="packtrain-tui-bench-"))
    checkpoints(root)
    load = start_load(root, args.preset)
    try:
        psutil.cpu_percent()
        engine_cpu = psutil.Process(load.pid)
        engine_cpu.cpu_percent()
        latencies = asyncio.run(measure(Layout(root), args.presses, args.gap))
        busy, engine_busy = psutil.cpu_percent(), engine_cpu.cpu_percent()
    finally:
        load.terminate()
        load.wait()
    ms = sorted(1000 * x for x in latencies)
    print(f"{os.cpu_count()} CPUs; load: the {args.preset} engine used {engine_busy:.0f}% CPU (100% = one core), "
          f"all cores {busy:.0f}% busy, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"key press to repaint over {len(ms)} presses: median {statistics.median(ms):.1f} ms (goal < 100 ms), "
          f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
