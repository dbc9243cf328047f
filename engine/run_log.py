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
from typing import IO, Protocol

from engine import protocol as P


def human(event: P.Event) -> str | None:
    """The terminal line for an event: the shared wording, except errors, which the CLI prints
    itself, once, on stderr."""
    return None if isinstance(event, P.Error) else P.describe(event)


class EventSink(Protocol):
    """Something else that follows every event the log gets (engine.tracking.Trackers)."""

    def handle(self, event: P.Event, log: "RunLog") -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Event sink for one engine process. `enabled=False` (ranks other than 0) drops everything."""

    def __init__(self, *, events: bool, enabled: bool = True, stream: IO[str] | None = None,
                 quiet: bool = False) -> None:
        self.events = events
        self.enabled = enabled
        self.stream: IO[str] | None = None if quiet else stream if stream is not None else sys.stdout
        self.path: Path | None = None
        self._file: IO[str] | None = None
        # Events from before the log exists (setup decisions, resume checks) are shown at once and
        # written after the header, so a refused start writes nothing and a started one loses nothing.
        self._early: list[str] = []
        self.sinks: list[EventSink] = []

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
        for sink in self.sinks:
            sink.handle(event, self)

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
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None
