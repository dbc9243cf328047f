"""Sizes for people, in binary units everywhere: a checkpoint, a cache or free RAM reads the same in
the TUI, the CLI and `info`. Import-light: the TUI and the event wording use it."""

from __future__ import annotations

GIB = float(1 << 30)
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB', 21_000_000 -> '20.0 MiB'; '-' when the size is unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in UNITS[:-1]:
        if round(abs(value), 1) < 1024:
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} {UNITS[-1]}"


def format_gib(gib: float | None) -> str:
    """A size reported in GiB (the hardware snapshot's `*_gb` fields), in the same words."""
    return format_bytes(None if gib is None else gib * GIB)
