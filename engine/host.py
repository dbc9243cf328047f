"""What the machine offers regardless of framework: memory, usable cores, free disk, CPU name and flags.

Each backend adds its accelerator facts (engine.backends.*_hardware) to these for the snapshot that
`packtrain-engine info` prints and every run records. Sizes are GiB (2**30 bytes).
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import psutil

from engine.paths import Layout
from engine.units import GIB


def host_snapshot(layout: Layout) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "ram_total_gb": round(vm.total / GIB, 2),
        "ram_available_gb": round(vm.available / GIB, 2),
        "cpu_count": usable_cpus(),
        "python": platform.python_version(),
        "root": str(layout.root),
        "disk_free_gb": round(disk_free(layout.root) / GIB, 2),
    }


def cpuinfo(*keys: str) -> str | None:
    """First value of any of `keys` in /proc/cpuinfo (Linux); None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys and value.strip():
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU model: part of the key a precision measurement is cached under."""
    return cpuinfo("model name") or platform.processor() or platform.machine() or "cpu"


def usable_cpus() -> int:
    """Cores this process may run on (containers and taskset limit it below os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def disk_free(root: Path) -> int:
    """Free space where data will land; the root may not exist yet, so use its nearest ancestor."""
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
