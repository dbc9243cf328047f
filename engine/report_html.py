"""The report as one self-contained HTML page: images inlined as data URIs, CSS inline, no scripts
and no external assets, so the file can be mailed, archived or opened offline. Everything that
comes from disk is escaped."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

import yaml

from engine.catalog import CheckpointEntry
from engine.report import History

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.dim { color: #777; }
"""
CURVES = ("loss.png", "lr.png", "throughput.png", "memory.png", "grad_norm.png")


def render_html(h: History, *, config: dict[str, Any] | None, checkpoints: list[CheckpointEntry],
                cache_dir: Path | None, stats: dict[str, Any] | None, images: dict[str, bytes]) -> str:
    headers = [r["header"] for r in h.runs if r["header"]]
    newest = headers[-1] if headers else {}
    parts = [
        f"<h1>{escape(h.model)}</h1>",
        f'<p class="dim">Report written {escape(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} from '
        f"{len(h.runs)} run log(s).</p>",
        "<h2>Runs</h2>", _runs_table(h),
        "<h2>Curves</h2>",
        *(_image(images[name], name) for name in CURVES if name in images),
    ]
    if not any(name in images for name in CURVES):
        parts.append('<p class="dim">No step was logged yet.</p>')
    parts += ["<h2>Events</h2>", _events(h)]
    parts += ["<h2>Checkpoints</h2>", _checkpoints(checkpoints)]
    parts += ["<h2>Plan</h2>", _pairs(h.plan, skip=("v", "event", "ts")) if h.plan else _none("no plan logged")]
    parts += ["<h2>Cache</h2>", _cache(cache_dir, stats, images.get("doc_lengths.png"))]
    parts += ["<h2>Hardware</h2>", _pairs(newest.get("hardware")) if newest.get("hardware") else _none("not recorded")]
    parts += ["<h2>Config</h2>",
              f"<pre>{escape(yaml.safe_dump(config, sort_keys=False))}</pre>" if config else _none("not recorded")]
    if h.samples:
        parts += ["<h2>Samples</h2>", _samples(h.samples)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(h.model)}: packtrain report</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def _none(text: str) -> str:
    return f'<p class="dim">{escape(text)}</p>'


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{escape('-' if v is None else 'yes' if v else 'no')}</td>"
    if isinstance(v, int):
        return f'<td class="n">{v:,}</td>'
    if isinstance(v, float):
        return f'<td class="n">{v:,.4g}</td>'
    if isinstance(v, (dict, list)):
        return f"<td>{escape(json.dumps(v))}</td>"
    return f"<td>{escape(str(v))}</td>"


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{trs}</table>"


def _pairs(d: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    return _table((), ((k, v) for k, v in d.items() if k not in skip))


def _image(png: bytes, name: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(name)}" src="data:image/png;base64,{data}">'


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(ts, (int, float)) else "-"


def _runs_table(h: History) -> str:
    rows = []
    for r in h.runs:
        head, fin = r["header"] or {}, r["finished"] or {}
        hw = head.get("hardware") or {}
        rows.append((r["run"], _when(head.get("ts")), head.get("start_step"), r["last_step"], head.get("total_steps"),
                     head.get("resumed_from") or "new run", fin.get("reason") or "running or killed",
                     fin.get("final_loss"), hw.get("device"), hw.get("precision"), head.get("world_size")))
    return _table(("run", "started", "from step", "last logged step", "total steps", "start", "ended",
                   "final loss", "device", "precision", "processes"), rows)


def _events(h: History) -> str:
    rows = [(m.step, m.kind, m.text) for m in h.markers] + [(s, "warning", text) for s, text in h.warnings]
    if not rows:
        return _none("no resumes, growth, fallbacks, rollbacks or warnings")
    return _table(("step", "what", "detail"), sorted(rows, key=lambda r: r[0]))


def _checkpoints(entries: list[CheckpointEntry]) -> str:
    if not entries:
        return _none("no checkpoints on disk")
    rows = [(e.display_name, e.step, e.loss, e.eval_loss, _when(e.saved_at), e.size_bytes,
             ("valid" if e.valid else f"invalid: {e.reason}") + (", latest" if e.is_latest else ""))
            for e in sorted(entries, key=lambda e: e.step)]
    return _table(("checkpoint", "step", "loss", "eval loss", "saved", "bytes", "status"), rows)


def _cache(cache_dir: Path | None, stats: dict[str, Any] | None, lengths_png: bytes | None) -> str:
    if stats is None:
        return _none(f"no cache statistics found{f' at {cache_dir}' if cache_dir else ''}")
    doc = stats.get("doc_tokens") or {}
    facts = {k: v for k, v in stats.items() if k not in ("doc_tokens", "build", "manifest_hash")}
    parts = [f"<p>{escape(str(cache_dir))}</p>", _pairs(facts),
             "<p>Document lengths in tokens:</p>",
             _table(("min", "median", "p90", "p95", "p99", "max"),
                    [[doc.get(k) for k in ("min", "median", "p90", "p95", "p99", "max")]])]
    if lengths_png:
        parts.append(_image(lengths_png, "doc_lengths.png"))
    return "\n".join(parts)


def _samples(samples: list[dict[str, Any]]) -> str:
    out = []
    for s in samples:
        text = "\n".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in s.items() if k != "step")
        out.append(f"<p>step {escape(str(s['step']))}</p><pre>{escape(text)}</pre>")
    return "\n".join(out)
