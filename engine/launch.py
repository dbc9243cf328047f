"""Starting a long-running engine detached from whoever asked: the TUI, the HTTP API, a script.

The child runs `python -m engine` with the caller's interpreter, in its own session with stdin from
/dev/null and its output appended to training_logs/<model>.console.log, so closing the caller (or
losing the SSH connection) never stops training. Viewers then follow the run through its event log.
Import-light: the TUI uses this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.paths import Layout

CONSOLE_MARK = "--- packtrain-engine "  # starts each engine's section of the console file


def engine_argv(layout: Layout, *args: str) -> list[str]:
    """The engine is run as `python -m engine` with the caller's own interpreter and root."""
    return [sys.executable, "-m", "engine", "--root", str(layout.root), *args]


def engine_env() -> dict[str, str]:
    """The child imports the very engine package the caller imported, installed or not."""
    source_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    if source_root in path.split(os.pathsep):
        return dict(os.environ)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source_root, path])))


def spawn_detached(layout: Layout, model: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `packtrain-engine <args>` in its own session; returns the process and its console file."""
    layout.ensure()
    console = layout.console_log(model)  # next to the event logs, never parsed as one
    with open(console, "ab") as out:
        out.write(f"{CONSOLE_MARK}{' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            engine_argv(layout, *args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=engine_env(),
        )
    return proc, console


def resume_args(ref: str, *, max_steps: int | None = None, epochs: float | None = None) -> list[str]:
    """`resume` arguments that continue (or extend) a run. Epochs alone also clear any step or token
    budget, because a budget wins over the epoch plan and the run would not get longer."""
    args = ["resume", ref]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    if epochs is not None:
        args += ["--epochs", repr(float(epochs))]
        if max_steps is None:
            args += ["--max-steps", "none", "--max-tokens", "none"]
    return args
