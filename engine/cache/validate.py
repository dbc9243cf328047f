"""Validate a cache chunk by chunk, and repair exactly what is wrong.

Every listed chunk is checked for presence, size, LZ4 frame integrity, shape, raw hash and token
ids below the vocabulary size; unlisted chunk files and `.tmp-*` leftovers are strays (unless a
builder is running, when they are its work in progress). Chunks planned but never built are
pending, not damage: `cache build` or `cache fill` makes them. `--repair` rebuilds the bad
chunks, which must come out byte-identical to their records, and removes strays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import TMP_PREFIX
from engine.cache.chunks import ChunkDamaged, np_dtype, read_chunk_file
from engine.cache.locks import builder_active
from engine.cache.metadata import chunk_id_of, data_summary, has_flags, load_metadata
from engine.cache.tokenizer import check_cache_tokenizer
from engine.errors import UserError
from engine.paths import Layout
from engine.protocol import CacheProgress, CacheReady, Event

PROGRESS_INTERVAL_S = 0.25


@dataclass
class ValidationReport:
    path: Path
    n_chunks: int = 0
    n_sequences: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # cache-wide, e.g. a replaced tokenizer file
    pending: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    building: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # metadata.data_summary: format, examples, trained share

    @property
    def ok(self) -> bool:
        return not (self.bad or self.stray or self.problems)

    def lines(self) -> list[str]:
        out = [f"repaired chunk {k}" for k in self.repaired]
        out += [f"error: {p}" for p in self.problems]
        out += [f"bad chunk {k}: {reason}" for k, reason in self.bad]
        out += [f"stray file {name} (not listed in the metadata)" for name in self.stray]
        if self.ok:
            line = f"Cache validated: {self.n_chunks:,} chunks, {self.n_sequences:,} sequences"
            if self.data.get("trained_share") is not None:
                line += f" ({self.ready_event().data_line()})"
            if self.pending:
                line += f" ({len(self.pending):,} planned chunks not built yet: run `cache fill` or `cache build`)"
            if self.building:
                line += " (a build is running)"
            out.append(line)
        else:
            parts = [f"{len(self.bad)} bad chunk{'s' if len(self.bad) != 1 else ''}"] if self.bad else []
            parts += [f"{len(self.stray)} stray file{'s' if len(self.stray) != 1 else ''}"] if self.stray else []
            parts += [f"{len(self.problems)} cache problem{'s' if len(self.problems) != 1 else ''}"] if self.problems else []
            out.append(f"Cache invalid: {', '.join(parts)} in {self.path}; "
                       + ("`cache build --force-rebuild` starts over" if self.problems else "run `cache validate --repair`"))
        return out

    def ready_event(self) -> CacheReady:
        return CacheReady(cache=str(self.path), chunks=self.n_chunks, sequences=self.n_sequences, ok=self.ok,
                          bad=[{"chunk": k, "reason": r} for k, r in self.bad], **self.data)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "chunks": self.n_chunks, "sequences": self.n_sequences,
                "bad": [{"chunk": k, "reason": r} for k, r in self.bad], "stray": self.stray,
                "problems": self.problems, "pending": self.pending, "repaired": self.repaired,
                "building": self.building, **self.data}


def _check(path: Path, on_event: Callable[[Event], None] | None) -> ValidationReport:
    meta = load_metadata(path)
    report = ValidationReport(path, data=data_summary(meta))
    problem = check_cache_tokenizer(path, meta)
    if problem:
        report.problems.append(problem)
    seq_len, vocab, dtype = meta["seq_len"], meta["vocab_size"], np_dtype(meta["dtype"])
    chunks = meta["chunks"]
    started = last = time.time()
    for i, c in enumerate(chunks):
        try:
            read_chunk_file(path, c, seq_len=seq_len, dtype=dtype, vocab_size=vocab, flagged=has_flags(meta))
        except ChunkDamaged as e:
            report.bad.append((c["id"], str(e)))
        else:
            report.n_chunks += 1
            report.n_sequences += c["n_seqs"]
        now = time.time()
        if on_event is not None and (now - last >= PROGRESS_INTERVAL_S or i == len(chunks) - 1):
            last = now
            on_event(CacheProgress(stage="validate", cache=str(path), chunks_done=i + 1, chunks_total=len(chunks),
                                   eta_s=(now - started) / (i + 1) * (len(chunks) - i - 1)))
    report.building = builder_active(path)
    if not report.building:
        listed = {c["file"] for c in chunks}
        report.stray = sorted(p.name for p in path.iterdir()
                              if p.name.startswith(TMP_PREFIX) or (chunk_id_of(p.name) is not None and p.name not in listed))
    ids = {c["id"] for c in chunks}
    report.pending = [k for k in range(meta.get("planned_chunks") or 0) if k not in ids]
    return report


def validate_cache(path: str | Path, *, repair: bool = False, on_event: Callable[[Event], None] | None = None,
                   workers: int | None = None, layout: Layout | None = None) -> ValidationReport:
    from engine.cache.build import rebuild_chunks, resolve_cache_path

    path = resolve_cache_path(path, layout)
    report = _check(path, on_event)
    if repair and not report.ok:
        if report.problems:
            raise UserError(f"cannot repair {path}: {report.problems[0]}; `cache build --force-rebuild` starts over")
        rebuilt, mismatched = rebuild_chunks(path, [k for k, _ in report.bad], workers=workers, on_event=on_event,
                                             layout=layout)
        report = _check(path, on_event)
        report.repaired = rebuilt
        if mismatched:
            report.problems.append(f"chunk(s) {', '.join(map(str, mismatched))} cannot be rebuilt identically: the "
                                   "source changed since the cache was built")
    if on_event is not None:
        on_event(report.ready_event())
    return report
