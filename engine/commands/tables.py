"""Tables for people: the shared printer of `checkpoints list`, `runs list` and friends.

A narrow terminal drops whole columns (least useful first) rather than cutting names, and piped
output gets its natural width, so `| grep` sees whole rows.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any


def printed_json_or_empty(entries: Sequence[Any], *, as_json: bool, empty: str) -> bool:
    """The listing commands' first part: `--json` prints every entry's to_dict(), an empty listing
    says `empty`. True when that was all there is to print; else the caller prints its table."""
    if as_json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    elif not entries:
        print(empty)
    return as_json or not entries


def fit_columns(rows: list[dict[str, str]], width: int, drop_order: Sequence[str], wraps: str = "Status") -> list[str]:
    """Columns that fit `width` without cutting the first one; the `wraps` column may wrap."""
    columns = list(rows[0])
    natural = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    if wraps in natural:
        natural[wraps] = min(natural[wraps], 12)
    for victim in (None, *drop_order):
        if victim is not None:
            columns.remove(victim)
        if sum(natural[c] + 3 for c in columns) <= width:
            break
    return columns


def print_table(title: str, rows: list[dict[str, str]], *, right: set[str], drop_order: Sequence[str],
                wraps: str = "Status") -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 1000)  # piped: natural width, no ellipses
    columns = fit_columns(rows, console.width, drop_order, wraps)
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left",
                         no_wrap=column != wraps, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)


def format_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%m-%d %H:%M", time.localtime(ts))
