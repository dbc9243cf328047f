"""serve-model, the child the TUI talks to: a real process, JSON commands on stdin, events on stdout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine import protocol as P
from engine.paths import Layout
from tests.train_support import engine_cmd, engine_env
from tests.use_support import bytes_tokenizer_folder, make_checkpoint

pytestmark = pytest.mark.slow

LONG = 1024  # a sample of up to 1,000 tokens: long enough that a stop lands in the middle of it


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    layout = Layout.resolve(root)
    tokenizer = bytes_tokenizer_folder(root / "tokenizer")
    make_checkpoint(layout, "long", tokenizer, context=LONG)
    make_checkpoint(layout, "other", tokenizer, context=64, seed=1, step=5)
    (root / "text.txt").write_text("the cat sat on the mat. " * 500, encoding="utf-8")
    return root


class Child:
    def __init__(self, root: Path, *args: str) -> None:
        self.proc = subprocess.Popen(engine_cmd("serve-model", *args, "--events"), cwd=root, env=engine_env(root),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, command: P.ServeCommand | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((command if isinstance(command, str) else command.encode()) + "\n")
        self.proc.stdin.flush()

    def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"serve-model exited (rc={self.proc.wait()}): {self.proc.stderr.read()}"  # type: ignore[union-attr]
        event = json.loads(line)
        assert event["v"] == P.SCHEMA_VERSION
        return event

    def until_done(self, request: str) -> list[dict[str, Any]]:
        events = [self.event()]
        while not (events[-1]["event"] == "done" and events[-1]["request"] == request):
            events.append(self.event())
        return events


def generation(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e["event"] == "generation_done")


def test_generate_streams_tokens_and_a_stop_interrupts_it_and_what_was_queued(root: Path) -> None:
    child = Child(root, "long")
    loaded = child.event()
    assert loaded["event"] == "model_loaded" and loaded["checkpoint"] == "long_checkpoint_1_run_1"
    assert loaded["context"] == LONG and loaded["step"] == 1

    child.send(P.GenerateCommand(id="g1", prompt="the cat", temperature=0, max_new_tokens=20))
    events = child.until_done("g1")
    first = generation(events)
    assert [e["event"] for e in events[:2]] == ["generation_started", "token"]
    assert all(e["request"] == "g1" for e in events)
    assert "".join(e["text"] for e in events if e["event"] == "token") == first["text"]
    assert (first["reason"], first["new_tokens"], events[-1]["status"]) == ("length", 20, "ok")

    child.send(P.GenerateCommand(id="g2", prompt="the cat", temperature=0, max_new_tokens=LONG - 24))
    assert child.event()["event"] == "generation_started"
    assert child.event()["event"] == "token"
    child.send(P.StopCommand())
    events = child.until_done("g2")
    stopped = generation(events)
    assert stopped["reason"] == "interrupted" and 0 < stopped["new_tokens"] < LONG - 24
    assert events[-1]["status"] == "interrupted"
    shorter = min(len(first["text"]), len(stopped["text"]))
    assert stopped["text"][:shorter] == first["text"][:shorter]  # the same greedy text, cut short

    child.send(P.GenerateCommand(id="g3", prompt="the cat", temperature=0, max_new_tokens=20))
    events = child.until_done("g3")  # a stop cancels what was read before it, not what comes after
    assert generation(events)["text"] == first["text"] and events[-1]["status"] == "ok"

    long = P.GenerateCommand(id="a", prompt="x", temperature=0, max_new_tokens=LONG - 8)
    child.send("\n".join([long.encode(), P.GenerateCommand(id="b", prompt="y").encode(), P.StopCommand().encode()]))
    assert child.until_done("a")[-1]["status"] == "interrupted"
    queued = child.until_done("b")
    assert [(e["event"], e["status"]) for e in queued] == [("done", "interrupted")]  # never started
    child.send(P.GenerateCommand(id="c", prompt="z", max_new_tokens=3, seed=1))
    assert child.until_done("c")[-1]["status"] == "ok"
    child.proc.stdin.close()  # the parent went away: the child ends too
    assert child.proc.wait(timeout=60) == 0


def test_eval_load_and_refusals_keep_the_session_serving(root: Path) -> None:
    child = Child(root, "long")
    child.event()
    child.send("not json")
    error = child.event()
    assert error["event"] == "error" and error["message"].startswith("bad command: not JSON")
    child.send('{"command": "generate", "top_p": 2}')
    assert "top_p must be in (0, 1]" in child.event()["message"]

    child.send(P.EvalCommand(id="e1", source=str(root / "text.txt"), batches=1))
    events = child.until_done("e1")
    assert [e["event"] for e in events] == ["eval_progress", "eval_result", "done"]
    result = events[1]
    assert result["data_kind"] == "source" and result["tokens"] == 8 * LONG and result["request"] == "e1"
    kept = (root / "checkpoints" / "long" / "evals.jsonl").read_text().splitlines()
    assert json.loads(kept[-1])["loss"] == result["loss"]

    child.send(P.EvalCommand(id="e2"))  # a made checkpoint has no run, so no held-out chunks
    done = child.until_done("e2")[-1]
    assert done["status"] == "error" and "evaluate with --cache PATH or --source SPEC" in done["message"]

    child.send(P.LoadCommand(id="l1", checkpoint="nope"))
    done = child.until_done("l1")
    assert [e["event"] for e in done] == ["done"] and done[0]["status"] == "error"
    child.send(P.LoadCommand(id="l2", checkpoint="other"))
    loaded, done = child.until_done("l2")
    assert (loaded["event"], loaded["checkpoint"], loaded["context"]) == ("model_loaded", "other_checkpoint_5_run_1", 64)
    assert done["status"] == "ok"
    child.send(P.GenerateCommand(id="g", max_new_tokens=64))
    done = child.until_done("g")[-1]
    assert done["status"] == "error" and "context of 64 tokens" in done["message"]
    child.send(P.QuitCommand())
    assert child.proc.wait(timeout=60) == 0
