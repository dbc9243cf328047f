"""The report's PNG plots, drawn by matplotlib on its Agg canvas (no display, no pyplot state).

Every curve is against the optimizer step, with a vertical line wherever a run resumed, the dataset
grew, or a newer engine logged an OOM fallback or a rollback.
"""

from __future__ import annotations

import io
from typing import Any

from engine.report import History, Marker

MARKER_STYLE = {"resume": ("tab:blue", "--"), "growth": ("tab:green", ":"), "fallback": ("tab:red", "-."),
                "rollback": ("tab:purple", "-.")}
MARKER_LABEL = {"resume": "resume", "growth": "dataset grew", "fallback": "OOM fallback", "rollback": "rollback"}


def render_plots(h: History, hist: dict[int, int], stats: dict[str, Any] | None) -> dict[str, bytes]:
    """{file name: PNG bytes}: the curves when any step was logged, the document lengths when known."""
    import numpy as np

    out: dict[str, bytes] = {}
    if h.n_steps:
        c = {name: np.frombuffer(column, dtype=np.float64) for name, column in h.columns.items()}
        x = c["step"]
        out["loss.png"] = _curve("Loss", "loss", x, [("train", c["loss"])], h.markers, evals=h.evals)
        out["lr.png"] = _curve("Learning rate", "LR", x, [("lr", c["lr"])], h.markers)
        out["throughput.png"] = _curve("Throughput", "tokens/s", x, [("tok/s", c["tokens_per_sec"])], h.markers)
        memory = [("process RSS", c["rss_gb"])]
        if np.nanmax(c["device_mem_gb"], initial=0.0) > 0:
            memory.append(("device", c["device_mem_gb"]))
        out["memory.png"] = _curve("Memory", "GB", x, memory, h.markers)
        out["grad_norm.png"] = _curve("Gradient norm (before clipping)", "grad norm", x, [("grad norm", c["grad_norm"])],
                                      h.markers)
    if hist:
        out["doc_lengths.png"] = _lengths(hist, stats)
    return out


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Any, ax: Any) -> bytes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curve(title: str, ylabel: str, x: Any, series: list[tuple[str, Any]], markers: list[Marker],
           evals: list[tuple[int, float]] | None = None) -> bytes:
    fig, ax = _figure()
    for label, y in series:
        ax.plot(x, y, lw=1, label=label)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", ms=3, lw=1, label="eval")
    shown: set[str] = set()
    for m in markers:
        color, style = MARKER_STYLE.get(m.kind, ("tab:gray", "--"))
        label = MARKER_LABEL.get(m.kind, m.kind) if m.kind not in shown else None
        ax.axvline(m.step, color=color, ls=style, lw=1, alpha=0.8, label=label)
        shown.add(m.kind)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    return _png(fig, ax)


def _lengths(hist: dict[int, int], stats: dict[str, Any] | None) -> bytes:
    """Documents per length on log-spaced bins (the cache keeps lengths to 6 significant bits)."""
    import numpy as np

    lengths = np.maximum(np.array(list(hist), dtype=np.float64), 1.0)  # empty documents go in the first bin
    counts = np.array(list(hist.values()), dtype=np.float64)
    edges = np.unique(np.round(np.geomspace(lengths.min(), lengths.max() + 1.0, 41)))
    if len(edges) < 2:
        edges = np.array([1.0, 2.0])
    binned, _ = np.histogram(lengths, bins=edges, weights=counts)
    fig, ax = _figure()
    ax.stairs(binned, edges, fill=True, alpha=0.6, label="documents")
    ax.set_xscale("log")
    doc = (stats or {}).get("doc_tokens") or {}
    for name, color in (("median", "tab:orange"), ("p90", "tab:red"), ("p99", "tab:purple")):
        if isinstance(doc.get(name), int):
            ax.axvline(max(doc[name], 1), color=color, ls="--", lw=1, label=f"{name} {doc[name]:,}")
    if isinstance((stats or {}).get("seq_len"), int):
        ax.axvline(stats["seq_len"], color="black", ls=":", lw=1, label=f"seq_len {stats['seq_len']:,}")
    ax.set(title="Document lengths", xlabel="tokens per document", ylabel="documents")
    return _png(fig, ax)
