"""Exact resume after kill -9, resume after the cache grew, and kills that land inside a save."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train_support import (
    BACKENDS, build_tiny_cache, data_flags, read_log, read_trace, run_engine, start_engine, step_losses, train_flags, wait_event,
    weights, write_corpus,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    build_tiny_cache(root, write_corpus(root))
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_after_checkpoint_then_resume_matches_uninterrupted_run(root: Path, backend: str) -> None:
    corpus = root / "docs.jsonl"
    common = [*data_flags(corpus), *train_flags(max_steps=40, save_interval=5, backend=backend)]
    whole, cut = f"whole_{backend}", f"cut_{backend}"
    done = run_engine(root, "train", "--name", whole, *common)
    assert done.returncode == 0, done.stderr
    reference = step_losses(read_log(root, whole, 1))
    assert sorted(reference) == list(range(1, 41))

    proc = start_engine(root, "train", "--name", cut, *common)
    saved = wait_event(proc, lambda e: e["event"] == "checkpoint_saved" and e["step"] >= 10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = step_losses(read_log(root, cut, 1))
    assert max(first) < 40, "the engine finished before it was killed"

    again = run_engine(root, "resume", cut)
    assert again.returncode == 0, again.stderr
    assert f"Backend: {backend} " in again.stdout
    second = read_log(root, cut, 2)
    header = second[0]
    assert header["event"] == "run" and header["start_step"] >= saved["step"]
    resumed = step_losses(second)
    assert sorted(resumed) == list(range(header["start_step"] + 1, 41))  # nothing replayed, nothing skipped
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"
    a = weights(root / "checkpoints" / whole / "checkpoint_000040")
    b = weights(root / "checkpoints" / cut / "checkpoint_000040")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_growth_on_resume_recomputes_the_plan_and_never_repeats_a_sequence(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    cache = build_tiny_cache(tmp_path, corpus, "--max-chunks", "5")
    trace = tmp_path / "trace.jsonl"
    flags = [*data_flags(corpus), *train_flags(save_interval=100, micro_batch=8, grad_accum=2, warmup_steps=2),
             "--schedule", "linear", "--trace-data", str(trace)]
    proc = start_engine(tmp_path, "train", "--name", "grow", *flags)
    plan = wait_event(proc, lambda e: e["event"] == "plan")
    wait_event(proc, lambda e: e["event"] == "step" and e["step"] == 6)
    from engine.control import send_command
    from engine.paths import Layout

    send_command(Layout.resolve(tmp_path), "grow", "stop")
    wait_event(proc, lambda e: e["event"] == "finished" and e["reason"] == "stopped")
    assert proc.wait(timeout=60) == 0

    from engine.cache.reader import PackedCache

    before = PackedCache(cache)
    held_out = before.chunk_ids[-1]
    assert plan["total_steps"] == math.ceil((before.n_sequences - before.chunk_sizes[held_out]) / 16)

    build_tiny_cache(tmp_path, corpus)  # the rest of the chunks
    after = PackedCache(cache)
    assert len(after.chunk_ids) > len(before.chunk_ids)
    resumed = run_engine(tmp_path, "resume", "grow", "--trace-data", str(trace))
    assert resumed.returncode == 0, resumed.stderr
    n_train = after.n_sequences - after.chunk_sizes[held_out]
    total = math.ceil(n_train / 16)
    assert f"Dataset expanded: {before.n_sequences:,} → {after.n_sequences:,} sequences" in resumed.stdout
    assert f"Using dynamic total steps: {total:,} (was {plan['total_steps']:,})" in resumed.stdout
    events = read_log(tmp_path, "grow", 2)
    expanded = next(e for e in events if e["event"] == "cache_expanded")
    assert (expanded["n_before"], expanded["n_after"], expanded["total_steps_after"]) == (
        before.n_sequences, after.n_sequences, total)

    steps = read_trace(trace)
    assert [s["step"] for s in steps] == list(range(total))
    stream = [tuple(i) for s in steps for i in s["ids"]]  # the last step runs on into epoch 1
    epoch0 = stream[:n_train]
    assert len(set(epoch0)) == n_train, "a sequence was trained on twice within the epoch"
    assert held_out not in {c for c, _ in stream}, "the held-out chunk was trained on"
    expected = {(c, r) for c in after.chunk_ids if c != held_out for r in range(after.chunk_sizes[c])}
    assert set(epoch0) == expected  # every training sequence of the grown cache, exactly once

    before_lrs = [e["lr"] for e in read_log(tmp_path, "grow", 1) if e["event"] == "step"]
    after_lrs = [e["lr"] for e in events if e["event"] == "step"]
    slope_before = max(abs(b - a) for a, b in zip(before_lrs[2:], before_lrs[3:]))  # after warmup
    assert abs(after_lrs[0] - before_lrs[-1]) <= slope_before * 1.0001, "the LR jumped when the total changed"
    slope_after = max(abs(b - a) for a, b in zip(after_lrs, after_lrs[1:]))
    assert slope_after < slope_before  # the rest of the decay is stretched over the longer plan


def test_kills_during_saves_leave_a_resumable_run(tmp_path: Path) -> None:
    """Saving every step makes most of the run's time a save; kill -9 lands in or between saves."""
    corpus = write_corpus(tmp_path)
    build_tiny_cache(tmp_path, corpus)
    flags = [*data_flags(corpus), *train_flags(max_steps=400, save_interval=1, keep_last=2)]
    proc = start_engine(tmp_path, "train", "--name", "torn", *flags)
    for delay in (0.35, 0.6, 0.45):
        wait_event(proc, lambda e: e["event"] == "checkpoint_saved")
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        from engine.checkpoint import Checkpointer
        from engine.paths import Layout

        newest = Checkpointer(Layout.resolve(tmp_path), "torn").newest_valid()
        assert newest is not None
        proc = start_engine(tmp_path, "resume", "torn")
        header = wait_event(proc, lambda e: e["event"] == "run")
        assert header["start_step"] == int(newest.name.split("_")[1])
    os.kill(proc.pid, signal.SIGTERM)
    wait_event(proc, lambda e: e["event"] == "finished" and e["reason"] == "stopped")
    assert proc.wait(timeout=60) == 0
    leftovers = [p.name for p in (tmp_path / "checkpoints" / "torn").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
