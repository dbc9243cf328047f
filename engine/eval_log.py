"""Kept eval results: `checkpoints/<model>/evals.jsonl`, one protocol EvalResult event per line.

Beside the checkpoint folders, never inside one: a committed folder's MANIFEST lists exactly what was
saved, so a file added later would make the checkpoint fail its check. The file is appended like a
run log (one write of a whole line, then fsync) rather than rewritten, so an eval from the CLI and
one from the TUI at the same moment both land; a line torn by a kill is skipped by readers. A
record names its checkpoint by display name and by the weights file's manifest hash, so a
checkpoint saved again at the same step never shows the old weights' results.

Import-light: engine.catalog lists from it, and the TUI imports the catalog.
"""

from __future__ import annotations

import os

from engine.paths import Layout
from engine.protocol import EvalResult, encode, read_events


def append(layout: Layout, model: str, result: EvalResult) -> None:
    path = layout.evals_log(model)
    line = (encode(result) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn line from a killed writer stays on its own line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(layout: Layout, model: str) -> list[EvalResult]:
    """Every kept result of one model, oldest first; unreadable lines are skipped."""
    try:
        events, _ = read_events(str(layout.evals_log(model)))
    except OSError:
        return []
    return [e for e in events if isinstance(e, EvalResult)]


def latest(results: list[EvalResult], checkpoint: str, weights: str) -> EvalResult | None:
    """The newest result of exactly these weights, or None."""
    mine = [r for r in results if r.checkpoint == checkpoint and r.weights == weights]
    return max(mine, key=lambda r: r.ts) if mine else None
