"""stats.json + report.md next to a cache: what it holds and how well it packed and compressed.

Document-length percentiles come from per-chunk histograms that keep the top 6 bits of each
length (exact below 64 tokens, a lower bound within 3% above), so they merge across chunks,
builds and fills without keeping every length. min and max are exact.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_json, atomic_write_text
from engine.cache.metadata import REPORT_FILE, STATS_FILE, data_summary
from engine.units import format_bytes

PERCENTILES = (("median", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))


def _percentiles(hist: Counter[int]) -> dict[str, int | None]:
    total = sum(hist.values())
    out: dict[str, int | None] = {name: None for name, _ in PERCENTILES}
    if not total:
        return out
    keys = sorted(hist)
    for name, q in PERCENTILES:
        rank, seen = q * (total - 1), 0
        for k in keys:
            seen += hist[k]
            if seen > rank:
                out[name] = k
                break
    return out


def doc_length_hist(chunks: list[dict[str, Any]]) -> Counter[int]:
    """Document lengths of every chunk merged: {length bucket: documents}."""
    hist: Counter[int] = Counter()
    for c in chunks:
        hist.update({int(k): int(n) for k, n in (c.get("doc_tokens") or {}).get("hist", [])})
    return hist


def compute_stats(meta: dict[str, Any]) -> dict[str, Any]:
    chunks = meta["chunks"]
    hist = doc_length_hist(chunks)
    mins, maxs = [], []
    for c in chunks:
        summary = c.get("doc_tokens") or {}
        if summary.get("min") is not None:
            mins.append(summary["min"])
            maxs.append(summary["max"])
    sequences = sum(c["n_seqs"] for c in chunks)
    kept = sequences * (meta["seq_len"] + 1)
    tokens = sum(c["tokens"] for c in chunks)
    padding = sum(c.get("padding", 0) for c in chunks)  # instruction caches keep examples whole
    compressed = sum(c["compressed_bytes"] for c in chunks)
    builds = [b for b in meta.get("builds", []) if _positive(b.get("tokens")) and _positive(b.get("seconds"))]
    last = builds[-1] if builds else None
    return {
        "dataset_name": meta.get("dataset_name"),
        "seq_len": meta["seq_len"],
        "dtype": meta["dtype"],
        "vocab_size": meta["vocab_size"],
        "tokenizer": (meta.get("tokenizer") or {}).get("spec"),
        "source": (meta.get("source") or {}).get("spec"),
        "chunks": len(chunks),
        "planned_chunks": meta.get("planned_chunks"),
        "documents": sum(c["docs"][1] - c["docs"][0] for c in chunks),
        "tokens": tokens,
        "sequences": sequences,
        "tokens_dropped": tokens - kept + padding,
        "dropped_pct": 100.0 * (tokens - kept + padding) / tokens if tokens else 0.0,
        **data_summary(meta),
        "padding": padding,
        "padding_pct": 100.0 * padding / kept if kept else 0.0,
        "truncated": sum(c.get("truncated", 0) for c in chunks),
        "doc_tokens": {"min": min(mins) if mins else None, **_percentiles(hist), "max": max(maxs) if maxs else None},
        "text_bytes": sum(c.get("text_bytes", 0) for c in chunks),
        "raw_bytes": sum(c["raw_bytes"] for c in chunks),
        "compressed_bytes": compressed,
        "ratio_vs_uint16": compressed / (kept * 2) if kept else None,
        "build": None if last is None else {
            "mode": last.get("mode"), "seconds": last["seconds"], "tokens": last["tokens"], "workers": last.get("workers"),
            "tokens_per_s": last["tokens"] / last["seconds"]},
        "generation": meta["generation"],
        "manifest_hash": meta.get("manifest_hash"),
    }


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _n(v: Any) -> str:
    return "–" if v is None else f"{v:,}"


def format_report(s: dict[str, Any]) -> str:
    d = s["doc_tokens"]
    ratio = "–" if s["ratio_vs_uint16"] is None else f"{s['ratio_vs_uint16']:.3f}"
    build = s["build"]
    lines = [
        f"# Cache {s['dataset_name']} (seq_len {s['seq_len']})",
        "",
        f"- source: `{s['source']}`; tokenizer: `{s['tokenizer']}` (vocab {s['vocab_size']:,}, {s['dtype']})",
        f"- chunks: {s['chunks']:,}" + (f" of {s['planned_chunks']:,} planned" if s["planned_chunks"] else ""),
        f"- documents: {s['documents']:,}; tokens: {s['tokens']:,}; sequences: {s['sequences']:,}",
        f"- tokens dropped (remainder under one row per chunk): {s['tokens_dropped']:,} ({s['dropped_pct']:.2f}%)"
        if s["trained_share"] is None else
        f"- {s['format']} examples: {s['examples']:,}; {100 * s['trained_share']:.1f}% of target tokens train; "
        f"padding {s['padding']:,} tokens ({s['padding_pct']:.1f}% of rows); {s['truncated']:,} examples cut to one row "
        f"({s['tokens_dropped']:,} tokens dropped)",
        f"- size: {format_bytes(s['compressed_bytes'])} compressed, {format_bytes(s['raw_bytes'])} raw; "
        f"{ratio}x raw uint16",
        "- build: " + ("–" if build is None else
                       f"{build['tokens_per_s']:,.0f} tokens/s ({build['mode']}, {build['workers']} workers, "
                       f"{build['seconds']:.1f} s)"),
        "",
        "| document tokens | min | median | p90 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| | {_n(d['min'])} | {_n(d['median'])} | {_n(d['p90'])} | {_n(d['p95'])} | {_n(d['p99'])} | {_n(d['max'])} |",
        "",
    ]
    return "\n".join(lines)


def write_stats(cache_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    stats = compute_stats(meta)
    atomic_write_json(cache_dir / STATS_FILE, stats)
    atomic_write_text(cache_dir / REPORT_FILE, format_report(stats))
    return stats
