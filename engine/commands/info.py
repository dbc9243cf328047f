"""`packtrain-engine info [--json]`: the backend a run would pick and why, the hardware snapshot it
would record, and the precision `auto` picks here for the default config, with the reason behind it;
all before starting one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.config import BACKENDS, RunConfig
from engine.paths import Layout
from engine.units import format_gib

LABELS = {
    "backend": "Backend",
    "backend_reason": "Backend choice",
    "device": "Device",
    "device_name": "Device name",
    "device_count": "Devices",
    "bf16": "bf16 support",
    "cpu_capability": "CPU capability",
    "ram_total_gb": "RAM total",
    "ram_available_gb": "RAM available",
    "vram_gb": "VRAM",
    "cpu_count": "CPU cores",
    "torch": "torch",
    "transformers": "transformers",
    "mlx": "mlx",
    "mlx_lm": "mlx-lm",
    "python": "Python",
    "root": "Data root",
    "disk_free_gb": "Disk free",
    "precision": "Precision (auto)",
    "precision_reason": "Why",
}


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("info", help="show device, bf16 support, memory, disk and library versions",
                       description="Show the hardware snapshot saved into every run.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="report for this training backend (default: the one `train` would pick here)")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from engine.backends import choose, load

    layout = Layout.resolve()
    choice = choose(args.backend)
    backend = load(choice.name)
    snap = {"backend": choice.name, "backend_reason": choice.reason, **backend.facts(layout)}
    precision, why = backend.choose_precision("auto", snap["device"], RunConfig(), layout)
    snap.update(precision=precision, precision_reason=f"{why}, for the default config")
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="packtrain hardware", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in snap.items():
        table.add_row(LABELS.get(key, key), _human(key, value))
    Console(width=None if sys.stdout.isatty() else 1000).print(table)  # piped: natural width, no ellipses
    return 0


def _human(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_gb"):
        return format_gib(value)
    return str(value)
