"""Shared helpers for the training tests: a tiny corpus and cache, engine subprocesses, run logs.

Everything is tiny on purpose (preset 'tiny', byte tokenizer, seq_len 32, CPU fp32, one thread),
so a full train/kill/resume cycle costs a few seconds, most of it importing torch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backends import has_mlx_lm

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the cat sat on a mat and dog ran far away from home while birds sang in tall green trees "
         "def return import class self value print data model train step loss").split()


# The behavioural tests that run on every backend: mlx where mlx-lm is installed (CI installs it).
BACKENDS = [pytest.param("torch"),
            pytest.param("mlx", marks=pytest.mark.skipif(not has_mlx_lm(), reason="mlx-lm is not installed "
                                                                                  "(pip install -e '.[mlx]')"))]


def write_corpus(folder: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """Short synthetic documents, each tagged with its index so no two are alike."""
    rng = random.Random(seed)
    path = folder / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"text": f"doc {i}: {words}"}) + "\n")
    return path


def data_flags(corpus: Path) -> list[str]:
    return ["--source", str(corpus), "--tokenizer", "bytes", "--seq-len", "32", "--docs-per-chunk", "40"]


def train_flags(**overrides: Any) -> list[str]:
    flags = {"preset": "tiny", "precision": "fp32", "device": "cpu", "micro-batch": 4, "grad-accum": 2,
             "log-interval": 1, "lr": "3e-3", "seed": 7, "eval-interval": 1000, "warmup-steps": 3}
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    out: list[str] = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def engine_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PACKTRAIN_HOME=str(root), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def engine_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def run_engine(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(engine_cmd(*args), cwd=root, env=engine_env(root), capture_output=True, text=True,
                          timeout=timeout)


def start_engine(root: Path, *args: str) -> subprocess.Popen:
    """An engine with --events on a pipe, in its own session like the TUI starts it."""
    return subprocess.Popen(engine_cmd(*args, "--events"), cwd=root, env=engine_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_event(proc: subprocess.Popen, pred: Any, timeout: float = 300) -> dict:
    """Read events from the engine's stdout until one matches `pred`."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"engine exited (rc={proc.wait()}) before the event: {proc.stderr.read()}")
        event = json.loads(line)
        if pred(event):
            return event
    raise AssertionError("timed out waiting for an engine event")


def read_log(root: Path, model: str, run: int) -> list[dict]:
    path = root / "training_logs" / f"{model}_run_{run}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_tiny_cache(root: Path, corpus: Path, *extra: str) -> Path:
    done = run_engine(root, "cache", "build", *data_flags(corpus), *extra)
    assert done.returncode == 0, done.stderr
    return root / "cache" / "packed_sequences" / "32" / "docs"


def build_cache_in_process(root: Path) -> Path:
    """The tiny cache of `build_tiny_cache` (same corpus and flags) without spawning an engine."""
    from engine.cache.build import build_cache
    from engine.config import DataConfig
    from engine.paths import Layout

    corpus = write_corpus(root)
    build_cache(DataConfig(source=str(corpus), dataset_name="docs", tokenizer="bytes", seq_len=32, docs_per_chunk=40),
                Layout.resolve(root), workers=1)
    return root / "cache" / "packed_sequences" / "32" / "docs"
