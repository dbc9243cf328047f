"""Two gloo processes under torchrun match one process with the same global batch, loss for loss,
split each global batch between them, and resume (on two processes or on one)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from engine.faults import ENV

from tests.train_support import (
    build_tiny_cache, data_flags, engine_env, read_log, read_trace, run_engine, step_losses, train_flags, write_corpus,
)

pytestmark = pytest.mark.slow


def torchrun(root: Path, *args: str, restarts: int = 0, faults: str = "") -> subprocess.CompletedProcess:
    """Run torchrun; if it hangs, kill it with its ranks (they run in sessions of their own, so
    killing torchrun alone would leave them behind to slow every later test)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "engine", *args]
    proc = subprocess.Popen(cmd, cwd=root, env={**engine_env(root), ENV: faults}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        for leftover in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for 10 minutes:\n{err}{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A root with the tiny cache, and the flags every run here shares."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = write_corpus(root)
    build_tiny_cache(root, corpus)
    return root, [*data_flags(corpus), "--max-steps", "12", "--save-interval", "6"]


@pytest.fixture(scope="module")
def ddp_run(world: tuple[Path, list[str]]) -> Path:
    """`two`: 12 steps on two gloo processes (DDP), traced, with checkpoints at 6 and 12."""
    root, common = world
    two = torchrun(root, "train", "--name", "two", *common, *train_flags(micro_batch=4, grad_accum=1),
                   "--trace-data", str(root / "two.trace"))
    assert two.returncode == 0, two.stderr + two.stdout
    return root


def test_two_processes_match_one_and_resume(world: tuple[Path, list[str]], ddp_run: Path) -> None:
    tmp_path, common = world
    one = run_engine(tmp_path, "train", "--name", "one", *common, *train_flags(micro_batch=4, grad_accum=2),
                     "--trace-data", str(tmp_path / "one.trace"))
    assert one.returncode == 0, one.stderr

    single, double = step_losses(read_log(tmp_path, "one", 1)), step_losses(read_log(tmp_path, "two", 1))
    assert sorted(single) == sorted(double) == list(range(1, 13))
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=2e-5, abs=2e-5), step
    header = read_log(tmp_path, "two", 1)[0]
    assert header["world_size"] == 2

    # each rank read its own half of every global batch, and together they read the 1-process batch
    ref = read_trace(tmp_path / "one.trace")
    r0, r1 = read_trace(tmp_path / "two.trace.rank0"), read_trace(tmp_path / "two.trace.rank1")
    for a, b, c in zip(ref, r0, r1):
        assert a["ids"] == b["ids"] + c["ids"] and not set(map(tuple, b["ids"])) & set(map(tuple, c["ids"]))
    logged = [e["step"] for e in read_log(tmp_path, "two", 1) if e["event"] == "step"]
    assert logged == list(range(1, 13)), "only rank 0 writes the run log"

    # resume the 2-process run on 2 processes, and the 1-process run on 2 processes: same losses
    more = torchrun(tmp_path, "resume", "two", "--max-steps", "16")
    assert more.returncode == 0, more.stderr + more.stdout
    cross = torchrun(tmp_path, "resume", "one", "--max-steps", "16", "--grad-accum", "1")
    assert cross.returncode == 0, cross.stderr + cross.stdout
    # the same state resumed on the same global batch: the same losses, whatever the world size was
    resumed_two, resumed_one = step_losses(read_log(tmp_path, "two", 2)), step_losses(read_log(tmp_path, "one", 2))
    assert sorted(resumed_two) == sorted(resumed_one) == [13, 14, 15, 16]
    for step in resumed_two:
        assert resumed_one[step] == pytest.approx(resumed_two[step], rel=2e-5, abs=2e-5)
    assert read_log(tmp_path, "one", 2)[0]["world_size"] == 2


def step_norms(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["grad_norm"] for e in events if e["event"] == "step"}


def test_fsdp_matches_ddp_and_its_checkpoint_resumes_in_one_process(world: tuple[Path, list[str]],
                                                                    ddp_run: Path) -> None:
    """FSDP2 on two gloo processes: the DDP run's losses and clipped grad norms, the same checkpoint
    (full weights and AdamW state by name), and one process continues it as the DDP run went on."""
    root, common = world
    sharded = torchrun(root, "train", "--name", "sharded", *common, "--parallel", "fsdp",
                       *train_flags(micro_batch=4, grad_accum=1))
    assert sharded.returncode == 0, sharded.stderr + sharded.stdout
    assert "FSDP over 2 processes" in sharded.stdout
    fsdp_log, ddp_log = read_log(root, "sharded", 1), read_log(root, "two", 1)
    fsdp_losses, ddp_losses = step_losses(fsdp_log), step_losses(ddp_log)
    assert sorted(fsdp_losses) == list(range(1, 13))
    for step, loss in fsdp_losses.items():
        assert loss == pytest.approx(ddp_losses[step], rel=2e-5, abs=2e-5), step
        assert step_norms(fsdp_log)[step] == pytest.approx(step_norms(ddp_log)[step], rel=1e-5), step
    (fsdp_eval,), (ddp_eval,) = ([(e["step"], e["loss"]) for e in log if e["event"] == "eval"] for log in (fsdp_log, ddp_log))
    assert fsdp_eval == pytest.approx(ddp_eval, rel=2e-5)  # both ranks ran the eval's forwards together
    ours, theirs = root / "checkpoints" / "sharded" / "checkpoint_000006", root / "checkpoints" / "two" / "checkpoint_000006"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ours / name)), load_file(str(theirs / name))
        assert sorted(a) == sorted(b) and "lm_head.weight" not in a  # tied weights once, as DDP writes them
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")
    assert json.loads((ours / "trainer_state.json").read_text())["optimizer"] == \
        json.loads((theirs / "trainer_state.json").read_text())["optimizer"]

    # one process, the same global batch: step 7 is the DDP run's step 7 (an exact resume)
    resumed = run_engine(root, "resume", "sharded_checkpoint_6_run_1", "--parallel", "ddp", "--grad-accum", "2",
                         "--max-steps", "7")
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(read_log(root, "sharded", 2)) == {7: pytest.approx(ddp_losses[7], rel=2e-5, abs=2e-5)}


def test_an_oom_under_torchrun_restarts_the_group_on_the_next_rung(world: tuple[Path, list[str]],
                                                                   ddp_run: Path) -> None:
    """Micro-batches of 4 rows run out of memory: a rank records the next rung and exits, torchrun
    restarts the group, and the restarted `train` begins the run again with 2 x 2 (no checkpoint
    was written yet): the losses of the run that fit from the start."""
    root, common = world
    run = torchrun(root, "train", "--name", "restarted", *common, *train_flags(micro_batch=4, grad_accum=1),
                   restarts=1, faults="oom_above=2")
    assert run.returncode == 0, run.stderr + run.stdout
    assert ("Out of memory at step 1 with micro_batch 4 x grad_accum 1, gradient checkpointing off: micro-batch "
            "4 -> 2, gradient accumulation 1 -> 2 (same global batch); torchrun restarts the group, which continues "
            "with micro_batch 2 x grad_accum 2") in run.stderr

    run_file = json.loads((root / "checkpoints" / "restarted" / "run.json").read_text())
    assert run_file["pending_fallback"] is None  # the restart began with it
    assert (run_file["config"]["train"]["micro_batch"], run_file["config"]["train"]["grad_accum"]) == (2, 2)
    first, second = run_file["runs"]
    assert first["fallbacks"] == [] and [(f["step"], f["micro_batch"], f["grad_accum"]) for f in second["fallbacks"]] \
        == [(0, 2, 2)]
    ended = read_log(root, "restarted", 1)[-1]
    assert (ended["event"], ended["reason"], ended["step"]) == ("finished", "error", 0)
    events = read_log(root, "restarted", 2)
    assert [(e["step"], e["micro_batch"], e["grad_accum"]) for e in events if e["event"] == "oom_fallback"] == [(0, 2, 2)]
    losses, reference = step_losses(events), step_losses(read_log(root, "two", 1))
    assert sorted(losses) == list(range(1, 13))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=2e-5, abs=2e-5), step
