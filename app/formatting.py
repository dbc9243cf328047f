"""Short human formats shared by the screens (sizes, times, losses)."""

from __future__ import annotations

import time


def format_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value:,.1f} TB"


def format_time(ts: float | None) -> str:
    """Local wall-clock time; the TZ of the person at the terminal is the one that matters."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def format_clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.3f}"


def format_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"
