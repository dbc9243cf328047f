"""The engine process: control commands from another process, signals, the lock, and bad input
refused with one line and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.control import live_engine, send_command
from engine.paths import Layout
from tests.train_support import (
    BACKENDS, build_tiny_cache, data_flags, read_log, run_engine, start_engine, step_losses, train_flags, wait_event,
    write_corpus,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root)
    build_tiny_cache(root, corpus)
    done = run_engine(root, "train", "--name", "done", *data_flags(corpus), *train_flags(max_steps=6, save_interval=3))
    assert done.returncode == 0, done.stderr
    return root


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def refused(root: Path, capsys: pytest.CaptureFixture, *argv: str) -> str:
    before = snapshot(root)
    rc = main(["--root", str(root), *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and "\n" not in err, err
    assert snapshot(root) == before, "a refused command wrote something"
    return err


@pytest.mark.parametrize(("argv", "match"), [
    (["--lr", "-1"], "train.lr"),
    (["--preset", "huge"], "unknown preset"),
    (["--name", "../escape"], "invalid model name"),
    (["--name", "a/b"], "invalid model name"),
    (["--micro-batch", "zero"], "expected int"),
    (["--cache", "/nonexistent/cache"], "no packed cache"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--backend", "jax"], "train.backend must be one of auto, torch, mlx"),
    (["--name", "done"], "already exists"),
    (["--tokenizer", "bpe:300"], "built with tokenizer"),
    (["--micro-batch", "100000"], "holds only"),
    (["--name", "done", "--dataset-name", "other"], "already exists"),
    (["--model-config", "/nonexistent/llama.json"], "cannot read model config"),
    (["--trace-data", "/nonexistent/dir/trace.jsonl"], "--trace-data"),
    (["--cache", "{root}/cache/packed_sequences/32/docs", "--seq-len", "64"], "not the seq_len 64 given"),
    (["--cache", "{root}/cache/packed_sequences/32/docs", "--tokenizer", "bpe:300"], "not the 'bpe:300' given"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(root: Path, capsys: pytest.CaptureFixture,
                                                        argv: list[str], match: str) -> None:
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=2)]
    assert match in refused(root, capsys, "train", *flags, *(a.replace("{root}", str(root)) for a in argv))


def test_bad_config_file(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 1\n")
    assert "lerning_rate" in refused(root, capsys, "train", "--config", str(bad))


def test_resume_refusals(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "finished" in refused(root, capsys, "resume", "done")
    assert "cannot change train.lr" in refused(root, capsys, "resume", "done", "--lr", "1")
    assert "global batch" in refused(root, capsys, "resume", "done", "--micro-batch", "3", "--max-steps", "9")
    assert "no run named" in refused(root, capsys, "resume", "nobody")
    assert "'1e400' is out of range" in refused(root, capsys, "resume", "done", "--max-steps", "1e400")
    foreign = root / "checkpoints" / "done" / "checkpoint_000099"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text("{}")
    try:
        refused(root, capsys, "resume", str(foreign), "--max-steps", "9")
    finally:
        shutil.rmtree(foreign)


def test_torn_newest_checkpoint_falls_back_and_a_torn_explicit_one_is_refused(root: Path, capsys) -> None:
    model = root / "checkpoints" / "done"
    copy = root / "checkpoints" / "tornrun"
    shutil.copytree(model, copy)
    try:
        (copy / "checkpoint_000006" / "model.safetensors").write_bytes(b"torn")
        err = refused(root, capsys, "resume", str(copy / "checkpoint_000006"), "--max-steps", "9")
        assert "unusable" in err or "torn" in err or "mismatch" in err
        done = run_engine(root, "resume", str(copy), "--max-steps", "4")  # the model folder: newest valid is 3
        assert "finished at step 3 of 4" not in done.stderr
        assert done.returncode == 0, done.stderr
        assert read_log(root, "tornrun", 2)[0]["start_step"] == 3
    finally:
        shutil.rmtree(copy)


def test_resume_refuses_a_cache_whose_used_chunks_changed(root: Path, capsys: pytest.CaptureFixture) -> None:
    meta_path = root / "cache" / "packed_sequences" / "32" / "docs" / "cache_metadata.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["chunks"][0]["hash"] = "0" * len(meta["chunks"][0]["hash"])
    meta_path.write_text(json.dumps(meta))
    try:
        err = refused(root, capsys, "resume", "done", "--max-steps", "9")
        assert "changed" in err or "damaged" in err or "invalid" in err
    finally:
        meta_path.write_text(original)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_control_channel_and_lock(root: Path, backend: str) -> None:
    layout = Layout.resolve(root)
    steer = f"steer_{backend}"
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=100_000, save_interval=7, backend=backend)]
    proc = start_engine(root, "train", "--name", steer, *flags)
    try:
        wait_event(proc, lambda e: e["event"] == "step" and e["step"] >= 2)
        info = live_engine(layout, steer)
        assert info is not None and info.pid == proc.pid

        send_command(layout, steer, "pause")
        paused = wait_event(proc, lambda e: e["event"] == "state" and e["state"] == "paused")
        send_command(layout, steer, "save")
        saved = wait_event(proc, lambda e: e["event"] == "checkpoint_saved")
        time.sleep(0.6)
        logged = [e for e in read_log(root, steer, 1) if e["event"] == "step"]
        assert all(e["ts"] <= paused["ts"] + 0.01 for e in logged), "stepped while paused"
        assert logged[-1]["step"] == saved["step"]

        second = run_engine(root, "resume", steer)  # a second engine on the same model
        assert second.returncode != 0 and "another engine" in second.stderr

        send_command(layout, steer, "resume")
        wait_event(proc, lambda e: e["event"] == "state" and e["state"] == "running")
        wait_event(proc, lambda e: e["event"] == "step" and e["step"] > saved["step"])
        send_command(layout, steer, "stop_at_checkpoint")
        last = wait_event(proc, lambda e: e["event"] == "checkpoint_saved" and e["step"] > saved["step"])
        finished = wait_event(proc, lambda e: e["event"] == "finished")
        assert last["step"] % 7 == 0 and finished["reason"] == "stopped" and finished["step"] == last["step"]
        assert proc.wait(timeout=60) == 0
        assert live_engine(layout, steer) is None
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_exits_zero(root: Path) -> None:
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=100_000, save_interval=1000)]
    proc = start_engine(root, "train", "--name", "interrupted", *flags)
    wait_event(proc, lambda e: e["event"] == "step" and e["step"] >= 3)
    os.kill(proc.pid, signal.SIGINT)
    saved = wait_event(proc, lambda e: e["event"] == "checkpoint_saved")
    finished = wait_event(proc, lambda e: e["event"] == "finished")
    assert proc.wait(timeout=60) == 0
    assert finished["reason"] == "stopped" and finished["step"] == saved["step"]
    assert (root / "checkpoints" / "interrupted" / f"checkpoint_{saved['step']:06d}" / "MANIFEST.json").exists()


def test_sigterm_as_soon_as_the_run_is_announced_still_saves_and_exits_zero(root: Path) -> None:
    """A viewer may signal the moment it sees the header; the handlers must already be in place."""
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=100_000, save_interval=1000)]
    proc = start_engine(root, "train", "--name", "early", *flags)
    wait_event(proc, lambda e: e["event"] == "run")
    os.kill(proc.pid, signal.SIGTERM)
    finished = wait_event(proc, lambda e: e["event"] == "finished")
    assert proc.wait(timeout=60) == 0
    assert finished["reason"] == "stopped"
    assert (root / "checkpoints" / "early" / f"checkpoint_{finished['step']:06d}" / "MANIFEST.json").exists()

def test_a_run_killed_before_its_first_checkpoint_leaves_its_name_usable(root: Path) -> None:
    """Nothing to resume, so `train --name` starts again as run 2 instead of a dead end."""
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=100_000, save_interval=100_000)]
    proc = start_engine(root, "train", "--name", "retry", *flags)
    wait_event(proc, lambda e: e["event"] == "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = start_engine(root, "train", "--name", "retry", *flags)
    header = wait_event(again, lambda e: e["event"] == "run")
    os.kill(again.pid, signal.SIGTERM)
    wait_event(again, lambda e: e["event"] == "finished")
    assert again.wait(timeout=60) == 0
    assert header["run"] == 2 and header["start_step"] == 0
    runs = json.loads((root / "checkpoints" / "retry" / "run.json").read_text())["runs"]
    assert [r["run"] for r in runs] == [1, 2]
    assert read_log(root, "retry", 2)[0]["event"] == "run"

@pytest.mark.slow
def test_demo_runs_offline_end_to_end(tmp_path: Path) -> None:
    """The demo's own path (stdlib source, cache build, suggested name, checkpoint), made tiny."""
    done = run_engine(tmp_path, "demo", "--preset", "tiny", "--tokenizer", "bytes", "--seq-len", "32",
                      "--max-chunks", "3", "--max-steps", "4", "--micro-batch", "2", "--log-interval", "1",
                      "--eval-interval", "4", "--save-interval", "4")
    assert done.returncode == 0, done.stderr
    [model] = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert model.startswith("demo_") and "Stdlib_32" in model
    assert (tmp_path / "checkpoints" / model / "checkpoint_000004" / "MANIFEST.json").exists()
    assert "Step 4/4 (100.0%) | Loss: " in done.stdout
    events = read_log(tmp_path, model, 1)
    assert [e["event"] for e in events][0] == "run" and events[-1]["event"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_keeps_training_when_its_reader_goes_away(root: Path, backend: str) -> None:
    """A TUI that quits closes the pipe: the engine carries on, logging to its run log."""
    detached = f"detached_{backend}"
    flags = [*data_flags(root / "docs.jsonl"), *train_flags(max_steps=100_000, save_interval=1000, backend=backend)]
    proc = start_engine(root, "train", "--name", detached, *flags)
    try:
        seen = wait_event(proc, lambda e: e["event"] == "step" and e["step"] >= 2)["step"]
        proc.stdout.close()
        deadline = time.monotonic() + 60
        while max(e.get("step", 0) for e in read_log(root, detached, 1)) < seen + 20:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the engine stopped training without its reader"
            time.sleep(0.2)
        send_command(Layout.resolve(root), detached, "stop")
        assert proc.wait(timeout=60) == 0
        assert read_log(root, detached, 1)[-1]["event"] == "finished"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_saves_and_a_stop_between_log_steps_record_the_loss_of_the_saved_step(root: Path) -> None:
    """Losses are logged every 1000 steps here, so each checkpoint and the final loss must come
    from the step itself (they were the last logged loss, here none); a reference run logging
    every step says what those losses are."""
    steady = dict(schedule="constant", log_interval=1000, save_interval=3, keep_last=100, max_steps=100_000)
    proc = start_engine(root, "train", "--name", "quiet", *data_flags(root / "docs.jsonl"), *train_flags(**steady))
    try:
        saves = [wait_event(proc, lambda e: e["event"] == "checkpoint_saved")]
        send_command(Layout.resolve(root), "quiet", "stop")
        while (event := wait_event(proc, lambda e: e["event"] in ("checkpoint_saved", "finished")))["event"] != "finished":
            saves.append(event)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert event["reason"] == "stopped" and saves[-1]["step"] == event["step"]
    assert not any(e["event"] == "step" for e in read_log(root, "quiet", 1)), "a step was logged: the test proves nothing"

    reference = dict(steady, log_interval=1, max_steps=event["step"])
    done = run_engine(root, "train", "--name", "loud", *data_flags(root / "docs.jsonl"), *train_flags(**reference))
    assert done.returncode == 0, done.stderr
    truth = step_losses(read_log(root, "loud", 1))
    for saved in saves:
        state = json.loads((root / "checkpoints" / "quiet" / f"checkpoint_{saved['step']:06d}" / "trainer_state.json")
                           .read_text())
        assert state["loss"] == saved["loss"] == pytest.approx(truth[saved["step"]], rel=1e-5), saved
    assert event["final_loss"] == saves[-1]["loss"]
