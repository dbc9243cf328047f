"""Two gloo processes under torchrun match one process with the same global batch, loss for loss,
split each global batch between them, and resume (on two processes or on one)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.train_support import (
    build_tiny_cache, data_flags, engine_env, read_log, read_trace, run_engine, step_losses, train_flags, write_corpus,
)

pytestmark = pytest.mark.slow


def torchrun(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run torchrun; if it hangs, kill it with its ranks (they run in sessions of their own, so
    killing torchrun alone would leave them behind to slow every later test)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "engine", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=engine_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        for leftover in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for 10 minutes:\n{err}{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_match_one_and_resume(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    build_tiny_cache(tmp_path, corpus)
    common = [*data_flags(corpus), "--max-steps", "12", "--save-interval", "6"]

    one = run_engine(tmp_path, "train", "--name", "one", *common, *train_flags(micro_batch=4, grad_accum=2),
                     "--trace-data", str(tmp_path / "one.trace"))
    assert one.returncode == 0, one.stderr
    two = torchrun(tmp_path, "train", "--name", "two", *common, *train_flags(micro_batch=4, grad_accum=1),
                   "--trace-data", str(tmp_path / "two.trace"))
    assert two.returncode == 0, two.stderr + two.stdout

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
