"""First screen: what this machine offers, as checks that turn [COMPLETE] one by one.

Checks that need only the standard library and psutil complete at once; the ones that need the
training framework (which backend and why, device, libraries, the precision `auto` picks and the
engine's measured reason) come from `packtrain-engine info --json` in a worker, so the screen paints
before torch or mlx loads.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import psutil
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual.worker import Worker

from app.engine_client import run_json
from app.workers import ReportsWorkerFailures
from engine.units import format_bytes, format_gib


class Check(Static):
    """One line: a status tag and what was found."""

    def __init__(self, label: str, check_id: str) -> None:
        super().__init__(id=check_id, classes="check pending", markup=False)
        self.label = label
        self.set_result("CHECKING", "")

    def set_result(self, tag: str, text: str) -> None:
        self.update(f"[{tag:^8}] {self.label}" + (f": {text}" if text else ""))
        self.set_class(tag == "CHECKING", "pending")
        self.set_class(tag == "COMPLETE", "complete")
        self.set_class(tag == "FAILED", "failed")


def local_checks(root: str) -> dict[str, str]:
    """What we know without the engine: Python, RAM, and the data root's free disk."""
    vm = psutil.virtual_memory()
    existing = Path(root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    created = "" if existing == Path(root) else ", will be created"
    return {
        "python": platform.python_version(),
        "ram": f"{format_bytes(vm.available)} free of {format_bytes(vm.total)}",
        "root": f"{root} ({format_bytes(free)} free{created})",
    }


def engine_checks(info: dict[str, Any]) -> dict[str, str]:
    device = str(info.get("device", "cpu")).upper()
    name = info.get("device_name") or ""
    vram = info.get("vram_gb")
    backend = str(info.get("backend", "torch"))
    libs = ("mlx", "mlx_lm") if backend == "mlx" else ("torch", "transformers")
    return {
        "backend": f"{backend} ({info['backend_reason']})" if info.get("backend_reason") else backend,
        "device": f"{device} ({name})" if name else device,
        "bf16": "supported" if info.get("bf16") else "not native on this device",
        "precision": f"auto picks {info.get('precision', '?')}: {info.get('precision_reason', 'no reason given')}",
        "ram": f"{format_gib(info.get('ram_available_gb'))} free of {format_gib(info.get('ram_total_gb'))}; "
               + (f"VRAM {format_gib(vram)}" if vram else "no VRAM"),
        "libs": ", ".join(f"{lib.replace('_', '-')} {info.get(lib, '?')}" for lib in libs),
        "root": f"{info.get('root', '')} ({format_gib(info.get('disk_free_gb'))} free)",
    }


CHECKS = (
    ("python", "Python"),
    ("backend", "Backend"),
    ("device", "Device"),
    ("bf16", "bf16"),
    ("precision", "Precision"),
    ("ram", "Memory"),
    ("libs", "Libraries"),
    ("root", "Data root"),
)
LOCAL = ("python", "ram", "root")


class EnvironmentScreen(ReportsWorkerFailures, Screen[None]):
    BINDINGS = [Binding("enter,space", "continue", "Continue"), Binding("q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="env"):
            yield Static("Environment checks", classes="title")
            for check_id, label in CHECKS:
                yield Check(label, f"check-{check_id}")
            yield Static("", id="env-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        for key, text in local_checks(str(self.app.layout.root)).items():
            self._set(key, "COMPLETE", text)
        self.query_one("#env-hint", Static).update("Checking the engine... press Enter to continue at any time.")
        self.load_info()

    def _set(self, key: str, tag: str, text: str) -> None:
        self.query_one(f"#check-{key}", Check).set_result(tag, text)

    @work(exclusive=True, group="info", exit_on_error=False)
    async def load_info(self) -> None:
        info = await run_json(self.app.layout, "info", "--json")
        self.app.hardware = info
        for key, text in engine_checks(info).items():
            self._set(key, "COMPLETE", text)
        self.query_one("#env-hint", Static).update("All checks complete. Press Enter to continue.")

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        for key, _ in CHECKS:
            if key not in LOCAL:
                self._set(key, "FAILED", message)
        self.query_one("#env-hint", Static).update("The engine could not report its environment. Enter continues.")

    def action_continue(self) -> None:
        self.app.show_home()
