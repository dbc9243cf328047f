"""End to end through a real terminal: `packtrain` inside tmux, driven by send-keys, read by capture-pane.

Start a tiny training with Enter-Enter-Enter, watch the step count rise, detach, quit, relaunch,
find the run listed as running, attach, stop it with confirmation, and find its checkpoint listed.
Then, on a trained checkpoint, open the Playground and see the model's text on the terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from app_testkit import REPO, make_corpus

from engine import control
from engine.config import RunConfig
from engine.paths import Layout

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]
STEP = re.compile(r"Step (\d[\d,]*)/")


class Tmux:
    def __init__(self, socket: str, session: str) -> None:
        self.socket, self.session = socket, session

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            self.run("send-keys", "-t", self.session, key)
            time.sleep(0.15)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", self.session, "-l", text)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def wait(self, check: Callable[[str], object], what: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the terminal shows:\n{text}")
            time.sleep(0.25)

    def wait_for(self, needle: str, timeout: float = 90.0) -> str:
        return self.wait(lambda text: needle in text, repr(needle), timeout)


def step_on(text: str) -> int:
    found = STEP.findall(text)
    return int(found[0].replace(",", "")) if found else 0


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[tuple[Tmux, Layout]]:
    root = tmp_path / "root"
    env = {"PACKTRAIN_HOME": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "PS1": "$ "}
    socket, session = f"packtrain-test-{os.getpid()}", "tui"
    shell = "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " bash --norc --noprofile"
    subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", "new-session", "-d", "-s", session, "-x", "120",
                    "-y", "40", shell], check=True, cwd=tmp_path)
    layout = Layout(root)
    try:
        yield Tmux(socket, session), layout
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
        for info in control.live_engines(layout):
            os.kill(info.pid, signal.SIGKILL)


def test_train_detach_relaunch_attach_stop_in_a_real_terminal(terminal: tuple[Tmux, Layout], tmp_path: Path) -> None:
    tmux, layout = terminal
    corpus = make_corpus(tmp_path / "corpus", 200)
    cfg = RunConfig.from_dict({
        "model": {"preset": "tiny"},
        "data": {"source": str(corpus), "tokenizer": "bytes", "seq_len": 32, "docs_per_chunk": 20},
        "train": {"max_steps": 100_000, "log_interval": 1, "save_interval": 100_000, "eval_interval": 100_000},
    })
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump_yaml(), encoding="utf-8")
    launch = f"{shlex.quote(sys.executable)} -m app --config {shlex.quote(str(config))}"
    if shutil.which("packtrain"):
        launch = f"packtrain --config {shlex.quote(str(config))}"

    tmux.type(launch)
    tmux.keys("Enter")
    tmux.wait_for("Environment checks", 30)
    tmux.keys("Enter")
    tmux.wait_for("Press N to start a new training.")
    tmux.keys("n")
    tmux.wait_for("Name the new model")
    tmux.keys("Enter")  # the first suggestion
    tmux.wait_for("New training: 117K_Corpus_32")
    tmux.keys("Enter")  # the form's values (from --config)
    tmux.wait_for("Cache ready: 10 chunks", 60)
    tmux.keys("Enter")
    first = step_on(tmux.wait(step_on, "the first step"))
    later = step_on(tmux.wait(lambda text: step_on(text) > first + 2, "the step count to rise"))
    assert later > first

    tmux.keys("d")
    tmux.wait_for("running: attach", 20)
    tmux.keys("q")
    tmux.wait(lambda text: "running: attach" not in text and text.rstrip().endswith("$"), "the shell prompt", 20)
    engine = control.live_engine(layout, "117K_Corpus_32")
    assert engine is not None, "closing the TUI stopped the engine"

    tmux.type(launch)
    tmux.keys("Enter")
    tmux.wait_for("Environment checks", 30)
    tmux.keys("Enter")
    tmux.wait_for("running: attach", 20)
    tmux.keys("Enter")
    resumed = step_on(tmux.wait(lambda text: step_on(text) > later, "steps after attaching"))
    tmux.wait(lambda text: step_on(text) > resumed, "the attached view to keep moving")

    tmux.keys("q")
    tmux.wait_for("Stop training 117K_Corpus_32?", 20)
    tmux.keys("y")
    tmux.wait_for("Finished (stopped)", 60)
    tmux.keys("Escape")
    text = tmux.wait(lambda t: "Checkpoints" in t and "117K_Corpus_32_checkpoint_" in t, "the checkpoint list", 20)
    assert "running: attach" not in text and "latest" in text
    tmux.keys("q")
    assert control.live_engine(layout, "117K_Corpus_32") is None


def test_playground_generates_text_in_a_real_terminal(terminal: tuple[Tmux, Layout], tmp_path: Path) -> None:
    """Pick a checkpoint, G, type a prompt, Ctrl+G: the model's text appears on the terminal."""
    tmux, layout = terminal
    corpus = make_corpus(tmp_path / "corpus", 60)
    trained = subprocess.run(
        [sys.executable, "-m", "engine", "--root", str(layout.root), "train", "--name", "tiny", "--source",
         str(corpus), "--tokenizer", "bytes", "--seq-len", "64", "--docs-per-chunk", "20", "--preset", "tiny", "--max-steps", "30",
         "--micro-batch", "8", "--lr", "3e-3", "--eval-interval", "1000", "--save-interval", "1000",
         "--precision", "fp32", "--device", "cpu"],
        cwd=REPO, env=dict(os.environ, PACKTRAIN_HOME=str(layout.root), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                           HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr

    tmux.type(f"{shlex.quote(sys.executable)} -m app")
    tmux.keys("Enter")
    tmux.wait_for("Environment checks", 30)
    tmux.keys("Enter")
    tmux.wait_for("tiny_checkpoint_30_run_1")
    tmux.keys("G")
    tmux.wait_for("Ctrl+G generates.", 60)
    tmux.type("the model ")
    tmux.keys("C-g")
    text = tmux.wait(lambda t: "Done (" in t, "a finished sample", 60)
    lines = text.splitlines()
    below_status = "\n".join(lines[next(i for i, line in enumerate(lines) if "Done (" in line) + 1:-1])
    assert re.search(r"[a-z]{3,}", below_status), f"no generated text on the terminal:\n{text}"
    tmux.keys("Escape")
    tmux.wait_for("tiny_checkpoint_30_run_1", 20)
    tmux.keys("q")
    tmux.wait(lambda t: t.rstrip().endswith("$"), "the shell prompt", 20)
