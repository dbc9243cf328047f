"""Kept eval results: appended beside the checkpoints, readable after a torn write, matched to weights."""

from __future__ import annotations

from pathlib import Path

from engine import eval_log
from engine import protocol as P
from engine.paths import Layout


def result(loss: float, weights: str = "xxh3_64:a", ts: float = 1.0) -> P.EvalResult:
    return P.EvalResult(checkpoint="m_checkpoint_5_run_1", step=5, data="held-out", loss=loss, perplexity=1.0,
                        bpb=1.0, top1=0.5, top5=0.9, tokens=10, bytes=30, weights=weights, ts=ts)


def test_a_torn_line_costs_only_itself(tmp_path: Path) -> None:
    layout = Layout.resolve(tmp_path)
    layout.model_dir("m").mkdir(parents=True)
    eval_log.append(layout, "m", result(2.0))
    with open(layout.evals_log("m"), "a") as f:
        f.write(P.encode(result(9.0))[:25])  # a writer killed mid-line
    eval_log.append(layout, "m", result(3.0, ts=2.0))
    assert [r.loss for r in eval_log.read(layout, "m")] == [2.0, 3.0]
    assert eval_log.read(layout, "other") == []


def test_the_newest_result_of_the_same_weights_wins() -> None:
    kept = [result(2.0, ts=1.0), result(1.5, ts=3.0), result(0.1, weights="xxh3_64:b", ts=4.0)]
    assert eval_log.latest(kept, "m_checkpoint_5_run_1", "xxh3_64:a").loss == 1.5
    assert eval_log.latest(kept, "m_checkpoint_5_run_1", "xxh3_64:c") is None
    assert eval_log.latest(kept, "m_checkpoint_6_run_1", "xxh3_64:a") is None
