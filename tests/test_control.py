"""The command channel and the engine lock work across processes, survive kill -9 and ignore stale pids."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from engine.control import EngineLock, live_engine, live_engines, poll_commands, send_command
from engine.errors import UserError
from engine.paths import Layout


def test_commands_arrive_in_order_once(tmp_path) -> None:
    layout = Layout(tmp_path).ensure()
    for c in ("pause", "resume", "save", "stop"):
        send_command(layout, "m", c, sender="test")
    (layout.control_dir("m") / "zz-garbage.json").write_text("{not json")
    assert [c.command for c in poll_commands(layout, "m")] == ["pause", "resume", "save", "stop"]
    assert poll_commands(layout, "m") == []
    with pytest.raises(UserError):
        send_command(layout, "m", "explode")


def test_lock_excludes_a_second_engine_and_publishes_a_pidfile(tmp_path) -> None:
    layout = Layout(tmp_path).ensure()
    log = layout.run_log("m", 1)
    with EngineLock(layout, "m").acquire(1, log):
        info = live_engine(layout, "m")
        assert info is not None and info.run == 1 and info.log == str(log)
        assert [e.model for e in live_engines(layout)] == ["m"]
        with pytest.raises(UserError, match="another engine is already training 'm'"):
            EngineLock(layout, "m").acquire(2, log)
    assert live_engine(layout, "m") is None


def test_lock_is_released_by_kill_9_and_stale_pidfile_is_ignored(tmp_path) -> None:
    layout = Layout(tmp_path).ensure()
    script = (
        "import sys, time; from pathlib import Path; from engine.control import EngineLock; "
        "from engine.paths import Layout; L = Layout(Path(sys.argv[1])); "
        "EngineLock(L, 'm').acquire(1, L.run_log('m', 1)); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert live_engine(layout, "m").pid == proc.pid
        with pytest.raises(UserError):
            EngineLock(layout, "m").acquire(2, layout.run_log("m", 2))
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(layout.engine_pidfile("m").read_text())["pid"] == proc.pid  # left behind by kill -9
    assert live_engine(layout, "m") is None
    deadline = time.time() + 5
    while True:
        try:
            lock = EngineLock(layout, "m").acquire(2, layout.run_log("m", 2))
            break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.05)
    lock.release()


def test_a_dead_senders_temporary_is_dropped_but_a_fresh_one_is_left(tmp_path) -> None:
    import os

    layout = Layout(tmp_path).ensure()
    folder = layout.control_dir("m")
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tmp-123-abc", folder / ".tmp-456-def"
    stale.write_text('{"command": "st')
    fresh.write_text('{"command": "sa')
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert poll_commands(layout, "m") == []
    assert not stale.exists() and fresh.exists()
