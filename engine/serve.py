"""`serve-model`: the long-lived child that keeps one checkpoint loaded and answers commands.

The TUI never imports torch, so it starts this process once and talks to it: one JSON command per
line on stdin (engine.protocol.ServeCommand), events on stdout. Requests run one at a time on the
main thread, in the order they arrived. A reader thread parses stdin meanwhile, so a `stop` lands
while a request runs: it cancels every request read before it (the running one ends at its next
token or eval batch, with a `done` event of status `interrupted`; queued ones end the same way
without running) and none read after it. `quit`, or the end of stdin (the parent went away), stops
the running request and exits 0.

Every request ends with exactly one `done` event carrying its id; refusals (a bad checkpoint, a
cache of another tokenizer, a prompt too long for max_new_tokens) are a `done` with status
`error` and the one-line message, and the server keeps serving. A line that is not a command gets
an `error` event.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from engine import generate
from engine import protocol as P
from engine.errors import UserError
from engine.eval_data import plan, select
from engine.evaluate import run_eval
from engine.inference import LoadedModel
from engine.paths import Layout

Emit = Callable[[P.Event], None]


class Requests:
    """Sequence numbers of the requests read so far, and how far stops have cancelled them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received = 0
        self._cancelled = 0

    def receive(self) -> int:
        with self._lock:
            self._received += 1
            return self._received

    def stop(self) -> None:
        with self._lock:
            self._cancelled = self._received

    def cancelled(self, seq: int) -> bool:
        return seq <= self._cancelled


def read_commands(lines: Iterable[str], requests: Requests, inbox: "queue.Queue[Any]") -> None:
    """The reader thread: commands into `inbox` as (seq, command | ValueError); (0, None) at the end."""
    for line in lines:
        if not line.strip():
            continue
        try:
            command = P.decode_serve_command(line)
        except ValueError as e:
            inbox.put((0, e))
            continue
        if isinstance(command, P.StopCommand):
            requests.stop()
            continue
        inbox.put((requests.receive(), command))
        if isinstance(command, P.QuitCommand):
            break
    requests.stop()
    inbox.put((0, None))


def serve(layout: Layout, loaded: LoadedModel, *, emit: Emit, commands: Iterable[str],
          load: Callable[[str], LoadedModel]) -> int:
    requests = Requests()
    inbox: "queue.Queue[Any]" = queue.Queue()
    threading.Thread(target=read_commands, args=(commands, requests, inbox), daemon=True,
                     name="serve-commands").start()
    while True:
        seq, command = inbox.get()
        if command is None or isinstance(command, P.QuitCommand):
            return 0
        if isinstance(command, ValueError):
            emit(P.Error(message=f"bad command: {command}"))
            continue
        status, message = "interrupted", ""
        try:
            if not requests.cancelled(seq):
                status, loaded = handle(command, loaded, layout, emit, lambda: requests.cancelled(seq), load)
        except UserError as e:
            status, message = "error", str(e)
        except Exception as e:  # noqa: BLE001 - one failed request (out of memory, ...) must not end the session
            status, message = "error", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        emit(P.Done(request=command.id, command=command.kind, status=status, message=message))  # type: ignore[arg-type]


def handle(command: P.ServeCommand, loaded: LoadedModel, layout: Layout, emit: Emit,
           interrupted: Callable[[], bool], load: Callable[[str], LoadedModel]) -> tuple[str, LoadedModel]:
    """Run one request; returns its status and the model loaded afterwards."""
    if isinstance(command, P.GenerateCommand):
        samples = generate.run(loaded, generate.encode(loaded, command.prompt), command.sampling(), emit=emit,
                               interrupted=interrupted, request=command.id)
        return ("interrupted" if samples[-1].reason == "interrupted" else "ok"), loaded
    if isinstance(command, P.EvalCommand):
        count, batch_size = plan(loaded, layout, command.batches)
        data = select(loaded, layout, count, cache=command.cache, source=command.source)
        result = run_eval(loaded, data, layout, batch_size, emit=emit, interrupted=interrupted, request=command.id)
        return ("ok" if result is not None else "interrupted"), loaded
    if isinstance(command, P.LoadCommand):
        fresh = load(command.checkpoint)
        emit(fresh.loaded_event())
        return "ok", fresh
    raise UserError(f"{command.kind} is not a request")
