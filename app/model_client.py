"""The TUI's side of `packtrain-engine serve-model`: one long-lived child per open Playground.

The child keeps the checkpoint loaded between prompts; the TUI writes one JSON command per line
on its stdin (engine.protocol.ServeCommand) and reads events from its stdout. Closing stdin is
how the child is told to end (it exits 0 at end of input); a child that does not end in a few
seconds is killed, so closing a screen or the app never leaves a model loaded in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine_client import error_line, start_command, stdout_events
from engine import protocol
from engine.paths import Layout

QUIT_WAIT_S = 3.0


class ModelServer:
    """A started `serve-model --events` child; `events()` yields until it exits."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._stderr = asyncio.ensure_future(proc.stderr.read()) if proc.stderr else None
        self.stderr = ""

    @classmethod
    async def start(cls, layout: Layout, checkpoint: str) -> ModelServer:
        proc = await start_command(layout, ["serve-model", checkpoint, "--events"],
                                   stdin=asyncio.subprocess.PIPE, limit=1 << 22)
        return cls(proc)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def message(self) -> str:
        """Why the child ended: its one `error:` line, else its last line of stderr."""
        return error_line(self.stderr) if self.stderr.strip() else f"the model server exited with code {self.returncode}"

    def send(self, command: protocol.ServeCommand) -> bool:
        """Write one command; False when the child no longer reads its stdin."""
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing() or self._proc.returncode is not None:
            return False
        try:
            stdin.write((command.encode() + "\n").encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def events(self) -> AsyncIterator[protocol.Event]:
        assert self._proc.stdout is not None
        async for event in stdout_events(self._proc.stdout):
            yield event
        await self._proc.wait()
        if self._stderr is not None:
            self.stderr = (await self._stderr).decode("utf-8", "replace")

    async def close(self) -> None:
        """End of input asks the child to finish; it is killed if it does not within QUIT_WAIT_S."""
        if self._proc.returncode is None:
            if self._proc.stdin is not None and not self._proc.stdin.is_closing():
                self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), QUIT_WAIT_S)
            except asyncio.TimeoutError:
                self.kill()
            except asyncio.CancelledError:
                self.kill()
                raise
        if self._stderr is not None:
            self._stderr.cancel()

    def kill(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()

    @property
    def pid(self) -> int:
        return self._proc.pid
