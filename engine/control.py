"""The command channel, the engine lock and the pid file: how any process finds and steers an engine.

Commands are files in checkpoints/<model>/control/, written atomically by the sender and deleted by
the engine once read, so a viewer, a script or the TUI can all send `save`, `stop`, ... without a
socket or a shared parent. The engine polls between optimizer steps, which is also the only place
it may act on them.

Liveness is the pid file plus the process start time, so a recycled pid is never mistaken for the
engine. The flock on engine.lock is what actually excludes a second engine on the same model.
Import-light: the TUI uses this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from engine.atomic import TMP_PREFIX, atomic_write_json, atomic_write_text, read_json
from engine.errors import UserError
from engine.paths import Layout
from engine.protocol import COMMANDS, Command

STALE_TMP_S = 60.0  # a live sender finishes its write in milliseconds


def send_command(layout: Layout, model: str, command: str, sender: str = "") -> Path:
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    folder = layout.control_dir(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.json"
    atomic_write_text(path, Command(command=command, sender=sender).encode())  # type: ignore[arg-type]
    return path


# How people type the commands (`packtrain-engine control NAME stop-at-next-checkpoint`, the API's
# paths); the wire names in engine.protocol.COMMANDS are accepted too.
SPELLINGS: dict[str, str] = {"save": "save", "stop": "stop", "stop-at-next-checkpoint": "stop_at_checkpoint",
                             "pause": "pause", "resume": "resume"}


def command_named(word: str) -> str:
    command = SPELLINGS.get(word, word)
    if command not in COMMANDS:
        raise UserError(f"unknown command {word!r}; expected one of {', '.join(SPELLINGS)}")
    return command


def send_to_live(layout: Layout, model: str, word: str, sender: str) -> "EngineInfo":
    """Send a command to the live engine training `model`; refused when none is, since a command
    left for no engine would be void anyway (the next engine drops it at start)."""
    command = command_named(word)
    info = live_engine(layout, model)
    if info is None:
        raise UserError(f"no live engine is training {model!r}; nothing to {word}")
    send_command(layout, model, command, sender=sender)
    return info


def poll_commands(layout: Layout, model: str) -> list[Command]:
    """Take every pending command, oldest first; malformed files are dropped, never fatal."""
    folder = layout.control_dir(model)
    if not folder.is_dir():
        return []
    out: list[Command] = []
    now = time.time()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(TMP_PREFIX):  # a sender mid-write, or one that died there
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink()
            continue
        try:
            out.append(Command.decode(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        path.unlink(missing_ok=True)
    return out


@dataclass
class EngineInfo:
    """Contents of engine.json: who is training this model right now and where it logs."""

    model: str
    pid: int
    create_time: float
    run: int
    log: str
    started: float
    host: str = ""

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.create_time) < 1.0
        except (psutil.Error, OSError):
            return False


def live_engine(layout: Layout, model: str) -> EngineInfo | None:
    """The live engine training `model`, or None (stale pid files are ignored, not trusted)."""
    try:
        info = EngineInfo(**read_json(layout.engine_pidfile(model)))
    except (OSError, ValueError, TypeError):
        return None
    return info if info.alive() else None


def live_engines(layout: Layout) -> list[EngineInfo]:
    root = layout.checkpoints_root
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            info = live_engine(layout, d.name)
            if info is not None:
                found.append(info)
    return found


def flock_held(path: Path) -> bool:
    """True while any process (this one included) holds an exclusive or shared flock on `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # flock locks belong to this open file, so closing it frees only our probe
    return False


def engine_lock_held(layout: Layout, model: str) -> bool:
    """Unlike the pid file, the lock has no gap between an engine starting and engine.json appearing."""
    return flock_held(layout.engine_lock(model))


class EngineLock:
    """Held for the whole life of an engine on one model; released by the kernel even on kill -9."""

    def __init__(self, layout: Layout, model: str) -> None:
        self.layout = layout
        self.model = model
        self._fd: int | None = None

    def acquire(self, run: int, log: Path) -> "EngineLock":
        self.layout.model_dir(self.model).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.layout.engine_lock(self.model), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = live_engine(self.layout, self.model)
            who = f" (pid {other.pid})" if other else ""
            raise UserError(f"another engine is already training {self.model!r}{who}") from None
        self._fd = fd
        me = psutil.Process()
        info = EngineInfo(
            model=self.model, pid=me.pid, create_time=me.create_time(), run=run, log=str(log),
            started=time.time(), host=os.uname().nodename,
        )
        atomic_write_json(self.layout.engine_pidfile(self.model), asdict(info))
        poll_commands(self.layout, self.model)  # commands addressed to a previous engine are void
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.layout.engine_pidfile(self.model).unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "EngineLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
