"""Surviving: the OOM ladder and the divergence guard, met through the engine's fault hooks
(engine.faults) in real in-process runs of the tiny preset."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.assemble import continues_after_oom, new_run, resume_run, run_to_end
from engine.backends.base import DeviceOutOfMemory, Dist
from engine.cli import main
from engine.config import RunConfig
from engine.errors import UserError
from engine.faults import ENV
from engine.paths import Layout
from engine.report import collect
from engine.state import load_trainer_state
from engine.train import Options
from train_support import BACKENDS, build_cache_in_process, read_log, step_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny byte-level cache (seq_len 32) that every run here trains on."""
    r = tmp_path_factory.mktemp("robust")
    build_cache_in_process(r)
    return r


def config(root: Path, name: str, **train: Any) -> RunConfig:
    return RunConfig.from_dict(config_file(root, name, **train))


def config_file(root: Path, name: str, **train: Any) -> dict[str, Any]:
    """What a `--config` file of these runs holds."""
    settings = dict(micro_batch=4, grad_accum=2, lr=3e-3, seed=7, warmup_steps=3, max_steps=6, save_interval=3,
                    log_interval=1, eval_interval=1000, precision="fp32", device="cpu") | train
    return {"name": name, "model": {"preset": "tiny"}, "data": {"cache": str(root / "cache/packed_sequences/32/docs")},
            "train": settings}


def train(root: Path, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, faults: str = "") -> list[dict]:
    monkeypatch.setenv(ENV, faults)
    run_to_end(lambda: new_run(cfg, Layout.resolve(root), Options(quiet=True)))
    return read_log(root, cfg.name, 1)


def resume(root: Path, ref: str, monkeypatch: pytest.MonkeyPatch, faults: str = "", **train: Any) -> int:
    monkeypatch.setenv(ENV, faults)

    return run_to_end(lambda: resume_run(ref, Layout.resolve(root), Options(quiet=True),
                                         override=lambda cfg: replace_train(cfg, **train)))


def replace_train(cfg: RunConfig, **train: Any) -> RunConfig:
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def of_kind(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_oom_ladder_keeps_the_losses_and_a_resume_after_it_is_exact(
        root: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    plain = train(root, config(root, f"plain_{backend}", backend=backend), monkeypatch)
    laddered = train(root, config(root, f"ladder_{backend}", backend=backend), monkeypatch, faults="oom_above=1")

    fallbacks = of_kind(laddered, "oom_fallback")
    assert [(f["step"], f["micro_batch"], f["grad_accum"]) for f in fallbacks] == [(0, 2, 4), (0, 1, 8)]
    assert "micro_batch 4 x grad_accum 2" in fallbacks[0]["message"]
    markers = collect(Layout.resolve(root), f"ladder_{backend}").markers
    assert [(m.step, m.kind) for m in markers] == [(0, "fallback"), (0, "fallback")]  # on the report's plots
    expected, got = step_losses(plain), step_losses(laddered)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[k] for k in sorted(got)], [expected[k] for k in sorted(expected)], rtol=1e-5)
    name = f"ladder_{backend}"
    run_file = json.loads((root / "checkpoints" / name / "run.json").read_text())
    saved = RunConfig.from_dict(run_file["config"]).train
    assert (saved.micro_batch, saved.grad_accum) == (1, 8)  # what a resume trains with
    assert [(f["micro_batch"], f["grad_accum"]) for f in run_file["runs"][0]["fallbacks"]] == [(2, 4), (1, 8)]

    assert resume(root, f"{name}_checkpoint_3_run_1", monkeypatch) == 0
    resumed = step_losses(read_log(root, name, 2))
    assert resumed == {k: got[k] for k in (4, 5, 6)}
    final = root / "checkpoints" / name / "checkpoint_000006"
    assert load_trainer_state(final).run == 2


def test_gradient_checkpointing_is_the_second_rung_and_the_top_stops_with_a_checkpoint(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(root, "top", micro_batch=1, grad_accum=8)
    train(root, cfg, monkeypatch)
    with pytest.raises(UserError) as refused:
        resume(root, "top_checkpoint_3_run_1", monkeypatch, faults="oom_above=0", max_steps=9)
    message = str(refused.value)
    assert "out of device memory at step 4 with micro_batch 1 x grad_accum 8, gradient checkpointing on" in message
    events = read_log(root, "top", 2)
    assert [(f["micro_batch"], f["grad_checkpointing"]) for f in of_kind(events, "oom_fallback")] == [(1, True)]
    finished = of_kind(events, "finished")[-1]
    assert finished["reason"] == "error" and finished["checkpoint"] == "top_checkpoint_3_run_1"


def test_non_finite_steps_are_skipped_counted_and_a_streak_rolls_back_at_a_lower_lr(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = step_losses(train(root, config(root, "clean", max_steps=8), monkeypatch))
    events = train(root, config(root, "nan", max_steps=8), monkeypatch, faults="nan_at=5,6,7")

    (rollback,) = of_kind(events, "divergence_rollback")
    steps = {e["step"]: e for e in of_kind(events, "step") if e["ts"] < rollback["ts"]}
    assert [steps[k]["skipped_steps"] for k in (4, 5, 6)] == [0, 1, 2]
    assert (rollback["step"], rollback["to_step"], rollback["skipped"], rollback["lr_scale"]) == (7, 3, 3, 0.5)
    after = [e for e in of_kind(events, "step") if e["ts"] > rollback["ts"]]
    assert [e["step"] for e in after] == [4, 5, 6, 7, 8]
    assert after[0]["loss"] == pytest.approx(clean[4], rel=1e-6)  # step 4 replays with the checkpoint's state
    assert after[1]["lr"] == pytest.approx(steps[5]["lr"] * 0.5)
    assert [(m.step, m.kind) for m in collect(Layout.resolve(root), "nan").markers] == [(7, "rollback")]
    for step in (6, 8):  # step 6 was saved during the streak, then again after the rollback
        state = load_trainer_state(root / "checkpoints" / "nan" / f"checkpoint_{step:06d}")
        assert (state.guard.skipped_steps, state.guard.rollbacks, state.guard.lr_scale) == (3, 1, 0.5)


def test_a_divergence_before_any_checkpoint_stops_with_one_line(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="training diverged: 2 steps in a row up to step 2 .* no checkpoint"):
        train(root, config(root, "early", divergence_patience=2), monkeypatch, faults="nan_at=1,2")


def test_a_checkpoint_never_holds_non_finite_weights(root: Path, tmp_path: Path) -> None:
    import torch

    from engine.backends.torch_backend import TorchBackend
    from engine.checkpoint import Checkpointer, NonFiniteWeights
    from engine.model_config import llama_config

    cfg = RunConfig.from_dict({"model": {"preset": "tiny"}, "train": {"device": "cpu", "precision": "fp32"}})
    backend = TorchBackend(cfg)
    backend.build(llama_config(cfg.model, 260, 32, {}), cfg.train)
    assert backend.weights_finite()
    with torch.no_grad():
        next(backend.net.parameters())[0, 0] = float("nan")
    layout = Layout.resolve(tmp_path)
    with pytest.raises(NonFiniteWeights, match="not saving step 5: the weights hold NaN or inf"):
        Checkpointer(layout, "m").save(step=5, backend=backend, trainer_state={})
    assert not (layout.model_dir("m")).exists()


def test_a_rung_a_torchrun_rank_hands_over_is_where_the_restarted_train_continues(
        root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun the rank that runs out of memory cannot take a rung alone: it writes the rung
    to run.json and exits with one line. torchrun's restart of the same `train` command (the same
    job) resumes from the checkpoint with it, and the losses are the run's without the OOM."""
    expected = step_losses(train(root, config(root, "whole"), monkeypatch))
    train(root, config(root, "handed", max_steps=3), monkeypatch)  # the group's checkpoint at step 3
    monkeypatch.setenv(ENV, "")
    layout = Layout.resolve(root)
    trainer = resume_run("handed", layout, Options(quiet=True), override=lambda cfg: replace_train(cfg, max_steps=6))
    trainer.dist = Dist(rank=1, world_size=2)  # a rank of a 2-process group, at step 3
    for key, value in {"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                       "TORCHELASTIC_RUN_ID": "job-1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as stopped:
        trainer.fall_back(DeviceOutOfMemory("fault"))
    trainer.reader.close()
    assert str(stopped.value) == (
        "Out of memory at step 4 with micro_batch 4 x grad_accum 2, gradient checkpointing off: micro-batch 4 -> 2, "
        "gradient accumulation 2 -> 4 (same global batch); the group stops: `packtrain-engine resume handed` under "
        "torchrun continues from its last checkpoint with micro_batch 2 x grad_accum 4, gradient checkpointing off "
        "(torchrun --max-restarts N restarts the group by itself)")
    pending = json.loads(layout.run_json("handed").read_text())["pending_fallback"]
    assert (pending["step"], pending["micro_batch"], pending["grad_accum"], pending["job"]) == (3, 2, 4, "job-1")

    command = root / "handed.json"  # the command torchrun starts again: 4 x 2, 6 steps
    command.write_text(json.dumps(config_file(root, "handed")))
    restarted = config(root, "handed")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert continues_after_oom(restarted, layout) is None  # another job: `train` refuses the taken name
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # another node's agent, whose own workers did not fail
    assert continues_after_oom(restarted, layout) == "handed"
    damaged = layout.model_dir("damaged")
    damaged.mkdir()
    (damaged / "run.json").write_text("{not json")  # another model's: the scan for an unnamed command skips it
    assert continues_after_oom(dataclasses.replace(restarted, name=""), layout) == "handed"  # a command that names no run
    with pytest.raises(UserError):
        continues_after_oom(dataclasses.replace(restarted, name="damaged"), layout)
    shutil.rmtree(damaged)
    monkeypatch.setenv("PACKTRAIN_HOME", str(root))
    assert main(["train", "--config", str(command)]) == 0, capsys.readouterr().err

    events = read_log(root, "handed", 2)
    assert [(f["step"], f["micro_batch"], f["grad_accum"]) for f in of_kind(events, "oom_fallback")] == [(3, 2, 4)]
    assert events[0]["resumed_from"] == "handed_checkpoint_3_run_1"
    assert step_losses(events) == {k: pytest.approx(expected[k], rel=1e-5) for k in (4, 5, 6)}
    run_file = json.loads(layout.run_json("handed").read_text())
    assert run_file["pending_fallback"] is None
    assert (run_file["config"]["train"]["micro_batch"], run_file["config"]["train"]["grad_accum"]) == (2, 4)
    assert [[f["micro_batch"] for f in run["fallbacks"]] for run in run_file["runs"]] == [[], [2]]
