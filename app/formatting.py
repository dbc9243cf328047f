"""Short human formats shared by the screens (sizes, times, losses)."""

from __future__ import annotations

import time


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


def format_params(n: int) -> str:
    """A parameter count in three significant digits: 56.2K, 124M, 7.24B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)
