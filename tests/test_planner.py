"""The planner: `plan` measures candidate settings at the run's global batch and ranks them,
`train --auto-plan` trains with the winner and records the table, and the config form's Plan
button fills the winner in from `plan --json` run as an engine process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app_testkit import form_app, screen_text, wait_for
from engine.cli import main
from engine.config import RunConfig
from engine.errors import UserError
from engine.faults import ENV
from engine.paths import Layout
from engine.planner import Candidate, PlanResult, Trial, choose, table
from train_support import build_cache_in_process

pytestmark = pytest.mark.slow

FLAGS = ["--preset", "tiny", "--precision", "fp32", "--device", "cpu", "--micro-batch", "4", "--grad-accum", "2",
         "--plan-steps", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cache_in_process(tmp_path_factory.mktemp("plan"))


@pytest.fixture
def engine_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache's root as PACKTRAIN_HOME, micro-batches over 2 rows out of memory, one thread."""
    root = cache.parents[3]
    monkeypatch.setenv("PACKTRAIN_HOME", str(root))
    monkeypatch.setenv(ENV, "oom_above=2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return root


def test_plan_ranks_what_fits_by_speed_and_rejects_what_runs_out_of_memory(
        cache: Path, engine_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--cache", str(cache), *FLAGS, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    trials = result["trials"]
    assert sorted((t["micro_batch"], t["grad_accum"], t["grad_checkpointing"]) for t in trials) == [
        (2, 4, False), (2, 4, True), (4, 2, False), (4, 2, True), (8, 1, False), (8, 1, True)]
    fits = [t for t in trials if t["verdict"] == "ok"]
    assert {t["micro_batch"] for t in fits} == {2}
    assert all(t["verdict"] == "out of memory" for t in trials if t["micro_batch"] > 2)
    assert trials[:2] == fits and fits[0]["tokens_per_sec"] >= fits[1]["tokens_per_sec"] > 0
    assert result["winner"] == {k: fits[0][k] for k in ("micro_batch", "grad_accum", "grad_checkpointing", "compile")}
    assert result["global_batch"] == 8 and result["margin"] == 0.8 and result["memory"] == "RSS growth"


def test_train_auto_plan_trains_with_the_winner_and_records_the_plan(cache: Path, engine_env: Path) -> None:
    assert main(["train", "--auto-plan", "--cache", str(cache), *FLAGS, "--max-steps", "2", "--name", "planned"]) == 0
    run = json.loads((engine_env / "checkpoints" / "planned" / "run.json").read_text())
    winner = run["runs"][0]["auto_plan"]["winner"]
    assert winner["micro_batch"] == 2
    assert {k: run["config"]["train"][k] for k in winner} == winner  # what a resume trains with


def test_nothing_that_fits_is_one_line() -> None:
    rejected = Trial(Candidate(8, 1, False, False), 100.0, 9.0, "over the memory margin")
    result = PlanResult(backend="torch", device="cuda", precision="bf16", global_batch=8, seq_len=32, limit_gb=10.0,
                        margin=0.8, steps=3, memory="device peak", trials=[rejected])
    with pytest.raises(UserError, match="no candidate setting fits within 80% of 9.3 GiB"):
        choose(RunConfig(), result)
    assert "No candidate fits" in table(result)


async def test_the_form_plans_through_the_engine_and_fills_in_the_winner(cache: Path, engine_env: Path) -> None:
    draft = RunConfig.from_dict({"name": "form", "model": {"preset": "tiny"},
                                 "data": {"source": str(engine_env / "docs.jsonl"), "dataset_name": "docs",
                                          "tokenizer": "bytes", "seq_len": 32},
                                 "train": {"micro_batch": 8, "grad_accum": 1, "precision": "fp32", "device": "cpu"}})
    app = form_app(Layout(engine_env), draft)
    async with app.run_test(size=(100, 50)) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#plan").press()
        await wait_for(pilot, lambda: "Planning" in screen_text(app), 10, "the plan to start")
        await wait_for(pilot, lambda: "Plan: micro-batch" in screen_text(app), 120, "the plan's winner")
        assert "Plan: micro-batch 2 x 4" in " ".join(screen_text(app).split())
        cfg = form.collect()
    assert (cfg.train.micro_batch, cfg.train.grad_accum) == (2, 4)
    assert Layout(engine_env).config_yaml("form").is_file()


@pytest.mark.parametrize("flags, message", [
    (["plan", "--margin", "1.5"], "--margin must be in (0, 1], got 1.5"),
    (["plan", "--margin", "nan"], "--margin must be in (0, 1], got nan"),
    (["plan", "--plan-steps", "0"], "--plan-steps must be a positive integer, got 0"),
    (["train", "--auto-plan", "--margin", "0"], "--margin must be in (0, 1], got 0.0"),
])
def test_bad_planner_flags_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], flags: list[str],
                                                          message: str) -> None:
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    assert main([*flags, "--preset", "tiny"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []
