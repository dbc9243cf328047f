"""Where engine events go: the run's append-only JSONL log, and stdout as JSON (--events) or as
human lines (`Step 770/26,235 (2.9%) | Loss: 5.583 | 106,212 tok/s | ETA: 04:23h`).

The log file is the record a viewer re-attaches to, so it always gets every event, and the first
line is the RunStarted header. Stdout is a courtesy: if the reader of the pipe goes away (a TUI
that quit while the engine trains on, detached), output stops and training continues.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

from engine import protocol as P


def human(event: P.Event) -> str | None:
    """One line for a person, or None for events that are only for machines (errors included: the
    CLI prints those itself, once, on stderr)."""
    if isinstance(event, P.Step):
        return P.format_step(event)
    if isinstance(event, P.Eval):
        return f"Eval at step {event.step:,}: loss {event.loss:.3f} | perplexity {event.perplexity:,.2f}"
    if isinstance(event, P.CheckpointSaved):
        return f"Saved {event.display_name} ({event.bytes / 1e6:,.1f} MB in {event.seconds:.2f}s) -> {event.path}"
    if isinstance(event, P.RunStarted):
        where = f"resumed from {event.resumed_from}" if event.resumed_from else "new run"
        return f"Run {event.run} of {event.model} ({where}), step {event.start_step:,}, world size {event.world_size}"
    if isinstance(event, P.Plan):
        return (f"Plan: {event.total_steps:,} steps × {event.global_batch} sequences ({event.tokens_per_step:,} "
                f"tokens/step) over {event.n_sequences:,} training sequences, {event.schedule} schedule, "
                f"warmup {event.warmup_steps:,}, {event.n_params:,} parameters")
    if isinstance(event, P.State):
        if event.state == "running" and event.reason == "started":
            return None  # the run header already said so
        return {"paused": "Paused", "running": "Running"}.get(event.state, "Stopping") + (
            f" ({event.reason})" if event.reason else "")
    if isinstance(event, P.Log):
        return event.message
    if isinstance(event, P.Warning):
        return f"warning: {event.message}"
    if isinstance(event, P.Finished):
        tail = f", checkpoint {event.checkpoint}" if event.checkpoint else ""
        return f"Finished ({event.reason}) at step {event.step:,}{tail}"
    if isinstance(event, P.CacheReady):
        return f"Cache ready: {event.chunks:,} chunks, {event.sequences:,} sequences"
    return None


class RunLog:
    """Event sink for one engine process. `enabled=False` (ranks other than 0) drops everything."""

    def __init__(self, *, events: bool, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.events = events
        self.enabled = enabled
        self.stream: IO[str] | None = stream if stream is not None else sys.stdout
        self.path: Path | None = None
        self._file: IO[str] | None = None
        # Events from before the log exists (setup decisions, resume checks) are shown at once and
        # written after the header, so a refused start writes nothing and a started one loses nothing.
        self._early: list[str] = []

    def attach(self, path: Path, header: P.RunStarted) -> None:
        """Start the run log with its header; every later event is appended to it."""
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self.emit(header)
        for line in self._early:
            self._file.write(line + "\n")
        self._file.flush()
        self._early.clear()

    def emit(self, event: P.Event) -> None:
        if not self.enabled:
            return
        line = P.encode(event)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        elif not isinstance(event, P.CacheProgress):
            self._early.append(line)
        if self.events:
            self._print(line)
        else:
            text = human(event)
            if text is not None:
                self._print(text)

    def info(self, message: str) -> None:
        self.emit(P.Log(message=message))

    def warn(self, message: str) -> None:
        self.emit(P.Warning(message=message))

    def _print(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._drop_stdout()

    def _drop_stdout(self) -> None:
        """The reader left: keep training, point stdout at /dev/null so exit-time flushes are quiet."""
        was_stdout, self.stream = self.stream is sys.stdout, None
        if not was_stdout:
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
