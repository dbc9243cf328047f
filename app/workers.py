"""Where a failed worker reaches the user: one handler for the workers of the app and every screen.

A worker that raises ends in silence otherwise, and its screen waits forever ("Working..."). The
app and each screen that starts workers mix this in; a screen with a place for results overrides
`worker_failed` to say it there and to become usable again (retry, go back). Expected ends (an
engine that exited, a refused command) are caught where they happen; this is for everything else.
"""

from __future__ import annotations

from typing import Any

from textual.dom import DOMNode
from textual.worker import Worker, WorkerState

from app.engine_client import EngineCommandError, EngineGone
from engine.errors import UserError, os_error_line

SAID_FOR_USERS = (EngineCommandError, EngineGone, UserError)  # their message is already one clear line


def failure_line(error: BaseException | None) -> str:
    if isinstance(error, SAID_FOR_USERS):
        return str(error)
    if isinstance(error, OSError):
        return os_error_line(error)
    return f"{type(error).__name__}: {error}" if error is not None else "failed without an error"


class ReportsWorkerFailures(DOMNode):
    """Worker.StateChanged goes only to the node that owns the worker, so each owner mixes this in."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR:
            self.worker_failed(event.worker, failure_line(event.worker.error))

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        """Say what failed; the default is an error notification."""
        self.app.notify(message, severity="error", timeout=20, markup=False)
