"""Sparklines for throughput, memory, LR and grad norm on one step axis, latest values beside them."""

from __future__ import annotations

from collections.abc import Iterable
from statistics import fmean

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline

SPARKS = (
    ("tok_s", "tok/s", "{:,.0f}"),
    ("rss_gb", "RAM", "{:.2f} GB"),
    ("device_gb", "device", "{:.2f} GB"),
    ("lr", "LR", "{:.2e}"),
    ("grad_norm", "grad", "{:.3f}"),
)


class MetricSparks(Vertical):
    """One row per metric; Sparkline.data gets a fresh list, since mutating it would not redraw."""

    def compose(self) -> ComposeResult:
        for key, label, _ in SPARKS:
            with Horizontal(classes="spark-row"):
                yield Label(label, classes="spark-label")
                yield Sparkline([], id=f"spark-{key}", summary_function=fmean)
                yield Label("-", id=f"value-{key}", classes="spark-value")

    def show(self, series: dict[str, Iterable[float]]) -> None:
        for key, _, fmt in SPARKS:
            values = list(series[key])
            self.query_one(f"#spark-{key}", Sparkline).data = values
            self.query_one(f"#value-{key}", Label).update(fmt.format(values[-1]) if values else "-")
