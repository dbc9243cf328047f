"""Everything the TUI knows about talking to `packtrain-engine`: spawning it, following it, steering it.

The engine is always a separate process. Long-running engines (train, resume) start in their own
session with stdin from /dev/null, so closing the TUI - or losing the SSH connection - never stops
training; the TUI then follows the run by tailing its event log, exactly as it would for an engine
started from the CLI or torchrun. Short commands (`info --json`, `cache validate --events`,
`checkpoints delete --yes`) run with pipes and are awaited.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import control, protocol
from engine.errors import os_error_line
from engine.launch import CONSOLE_MARK, engine_argv, engine_env, spawn_detached
from engine.paths import Layout

POLL_S = 0.25
READ_CHUNK = 4 << 20  # bytes of log decoded per read, so attaching to a huge log never spikes memory


def tail_lines(path: Path | None, n: int = 12) -> list[str]:
    """The last lines an engine printed to its console file since it was started (the file
    collects every TUI-started run of a model, each after a CONSOLE_MARK line)."""
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    text = text.rsplit(CONSOLE_MARK, 1)[-1].split("\n", 1)[-1] if CONSOLE_MARK in text else text
    return [line for line in text.splitlines() if line.strip()][-n:]


def error_line(text: str) -> str:
    """The engine's one-line `error: ...` message, else the last non-empty line of its stderr."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else "the engine failed without a message"


# --- short commands -------------------------------------------------------------------------------


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def message(self) -> str:
        return error_line(self.stderr or self.stdout)


class EngineCommandError(Exception):
    """An engine command failed; the message is the engine's own one-line explanation."""


async def start_command(layout: Layout, args: Sequence[str], **options: Any) -> asyncio.subprocess.Process:
    """Start a short engine command with pipes. A program that cannot start (a missing interpreter,
    no processes left) is the command's failure, said in one line like the engine's own."""
    try:
        return await asyncio.create_subprocess_exec(
            *engine_argv(layout, *args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=engine_env(), **options,
        )
    except OSError as e:
        raise EngineCommandError(f"could not start the engine: {os_error_line(e)}") from None


async def run_command(layout: Layout, *args: str) -> CommandResult:
    proc = await start_command(layout, args)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:  # the screen went away: do not leave the child behind
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return CommandResult(proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


async def run_json(layout: Layout, *args: str) -> Any:
    """Run a `--json` command; a failure raises EngineCommandError carrying the engine's message."""
    result = await run_command(layout, *args)
    if not result.ok:
        raise EngineCommandError(result.message)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise EngineCommandError(f"unexpected output from packtrain-engine {' '.join(args)}") from None


@dataclass
class EventStream:
    """Events printed by a `--events` command on stdout, read as they come."""

    args: Sequence[str]
    returncode: int | None = None
    stderr: str = ""
    _proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    async def events(self, layout: Layout) -> AsyncIterator[protocol.Event]:
        self._proc = await start_command(layout, self.args, limit=1 << 22)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        stderr_task = asyncio.ensure_future(self._proc.stderr.read())
        try:
            async for raw in self._proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    yield protocol.decode(line)
                except ValueError:
                    yield protocol.Log(message=line)
            self.stderr = (await stderr_task).decode("utf-8", "replace")
            self.returncode = await self._proc.wait()
        finally:
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
            stderr_task.cancel()

    @property
    def message(self) -> str:
        return error_line(self.stderr)


# --- long-running engines -------------------------------------------------------------------------


@dataclass
class EngineHandle:
    """One engine the TUI follows: either spawned here (`proc`) or found through engine.json."""

    model: str
    proc: subprocess.Popen[bytes] | None = None
    console: Path | None = None
    info: control.EngineInfo | None = None
    log: Path | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None  # also reaps our child, so it never lingers as a zombie
        return self.info is not None and self.info.alive()

    @property
    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid
        return self.info.pid if self.info else None


def run_log_of(layout: Layout, model: str, pid: int) -> Path | None:
    """The run log an engine process wrote, by the pid in its first line: how a run is found even
    when the engine came and went between two looks at engine.json."""
    logs = sorted(layout.logs_root.glob(f"{model}_run_*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs[:3]:
        try:
            with open(log, encoding="utf-8") as f:
                if json.loads(f.readline()).get("pid") == pid:
                    return log
        except (OSError, ValueError, AttributeError):
            continue
    return None


def spawn_engine(layout: Layout, model: str, *args: str) -> EngineHandle:
    """Start `packtrain-engine <args>` detached from the TUI: own session, no stdin, output to a file."""
    proc, console = spawn_detached(layout, model, *args)
    return EngineHandle(model=model, proc=proc, console=console)


def attach_handle(layout: Layout, model: str) -> EngineHandle | None:
    info = control.live_engine(layout, model)
    return EngineHandle(model=model, info=info) if info is not None else None


class EngineGone(Exception):
    """The engine ended without a `finished` event (crashed, killed, or refused to start)."""

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


async def wait_for_engine(layout: Layout, handle: EngineHandle, poll: float = POLL_S) -> Path:
    """Wait until the engine has taken its lock and published its run log; return that log."""
    while handle.log is None:
        info = handle.info or control.live_engine(layout, handle.model)
        if info is not None and (handle.proc is None or info.pid == handle.proc.pid):
            handle.info = info
            log = Path(info.log)
            handle.log = log if log.is_absolute() else layout.root / log
        elif not handle.alive():
            handle.log = run_log_of(layout, handle.model, handle.pid or 0)
            if handle.log is None:
                lines = tail_lines(handle.console)
                code = handle.proc.returncode if handle.proc else None
                raise EngineGone(error_line("\n".join(lines)) if lines else f"the engine exited with code {code}",
                                 lines)
        else:
            await asyncio.sleep(poll)
    return handle.log


async def tail_events(
    layout: Layout, handle: EngineHandle, poll: float = POLL_S
) -> AsyncIterator[list[protocol.Event]]:
    """Yield batches of events from the engine's run log until it finishes or disappears."""
    log = await wait_for_engine(layout, handle, poll)
    offset = 0
    while True:
        try:
            events, offset = await asyncio.to_thread(protocol.read_events, str(log), offset, READ_CHUNK)
        except FileNotFoundError:
            events = []
        if events:
            yield events
            if any(isinstance(e, protocol.Finished) for e in events):
                return
            continue  # more may be buffered: read again before sleeping
        if not handle.alive():
            events, offset = await asyncio.to_thread(_read_rest, log, offset)
            if events:
                yield events
                if any(isinstance(e, protocol.Finished) for e in events):
                    return
            code = handle.proc.returncode if handle.proc else None
            why = f"exit code {code}" if code is not None else "no finished event"
            # only an engine we started wrote to our console file; for others the run log tells more
            lines = tail_lines(handle.console) if handle.proc is not None else []
            raise EngineGone(f"the engine process ended unexpectedly ({why})", lines)
        await asyncio.sleep(poll)


def _read_rest(log: Path, offset: int) -> tuple[list[protocol.Event], int]:
    try:
        return protocol.read_events(str(log), offset)
    except FileNotFoundError:
        return [], offset


def send(layout: Layout, model: str, command: str) -> None:
    control.send_command(layout, model, command, sender=f"tui:{os.getpid()}")
