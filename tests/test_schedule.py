"""The LR is a pure function of (step, anchors): warmup, each decay shape, and continuity on retotal."""

from __future__ import annotations

import math

import pytest

from engine.config import SCHEDULES, TrainConfig
from engine.schedule import Schedule, epoch_steps, plan_schedule, total_steps


def make(kind: str, total: int = 100, warmup: int = 10) -> Schedule:
    return Schedule(kind=kind, peak_lr=1e-3, min_lr=1e-4, warmup_steps=warmup, total_steps=total, wsd_decay_ratio=0.2)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_warmup_is_linear_and_reaches_peak(kind: str) -> None:
    s = make(kind)
    lrs = [s.lr(i) for i in range(10)]
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert s.lr(10) == pytest.approx(1e-3)


def test_shapes_end_at_min_lr_or_stay_constant() -> None:
    assert make("cosine").lr(100) == pytest.approx(1e-4)
    assert make("linear").lr(100) == pytest.approx(1e-4)
    assert make("wsd").lr(100) == pytest.approx(1e-4)
    assert make("constant").lr(99) == pytest.approx(1e-3)
    # cosine midpoint of the decay is halfway between peak and floor
    assert make("cosine").lr(55) == pytest.approx((1e-3 + 1e-4) / 2)
    # linear decays by equal amounts
    lin = make("linear")
    assert lin.lr(30) - lin.lr(40) == pytest.approx(lin.lr(70) - lin.lr(80))


def test_wsd_holds_peak_then_decays_over_the_last_fraction() -> None:
    s = make("wsd")  # decay over the last 20% of the 90 post-warmup steps: steps 82..100
    assert s.lr(50) == s.lr(82) == pytest.approx(1e-3)
    assert s.lr(91) == pytest.approx((1e-3 + 1e-4) / 2)
    assert s.lr(95) < s.lr(91) < s.lr(83)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("at", [5, 10, 40, 99])
def test_retotal_keeps_lr_continuous_and_the_past_unchanged(kind: str, at: int) -> None:
    old = make(kind)
    new = old.retotal(at, 250)
    for step in range(at + 1):
        assert new.lr(step) == pytest.approx(old.lr(step), rel=1e-12)
    # the next LR is within one old step's change of the previous one: no jump
    biggest_old_step = max(abs(old.lr(i + 1) - old.lr(i)) for i in range(99))
    assert abs(new.lr(at + 1) - new.lr(at)) <= biggest_old_step + 1e-15
    if kind != "constant":
        assert new.lr(250) == pytest.approx(1e-4)
        assert new.lr(200) > old.lr(200) or old.lr(200) == pytest.approx(1e-4)


def test_retotal_twice_composes() -> None:
    s = make("cosine").retotal(40, 200).retotal(120, 300)
    assert s.progress(40) == pytest.approx(make("cosine").progress(40))
    assert s.progress(300) == 1.0
    assert s.lr(300) == pytest.approx(1e-4)
    roundtrip = Schedule.from_dict(s.to_dict())
    assert [roundtrip.lr(i) for i in range(0, 300, 7)] == [s.lr(i) for i in range(0, 300, 7)]


def test_shrinking_below_the_current_step_goes_to_the_floor() -> None:
    s = make("cosine").retotal(60, 50)
    assert s.lr(61) == pytest.approx(1e-4)


def test_epoch_formula_uses_exact_decimals() -> None:
    assert epoch_steps(1, 1, 1000, 10) == 100
    assert epoch_steps(0.3, 1, 1000, 10) == 30  # 0.3 * 1000 is not 300.00000000000006 here
    assert epoch_steps(2, 0.5, 1001, 10) == 101
    assert epoch_steps(1.5, 1, 352_217, 8 * 4 * 2) == math.ceil(1.5 * 352_217 / 64)


def test_budgets_take_precedence_over_epochs() -> None:
    assert total_steps(TrainConfig(max_steps=77), 10_000, 8, 128) == 77
    assert total_steps(TrainConfig(max_tokens=10_000), 10_000, 8, 128) == math.ceil(10_000 / 1024)
    assert total_steps(TrainConfig(epochs=2), 1000, 8, 128) == 250


def test_smart_warmup_uses_estimated_full_dataset() -> None:
    t = TrainConfig(warmup_ratio=0.1, estimated_total_sequences=100_000)
    s, warnings = plan_schedule(t, 10_000, 10, 64)
    assert s.total_steps == 1000
    assert s.warmup_steps == 1000  # 10% of the 10,000 steps the full dataset will take
    assert warnings and "warmup" in warnings[0]
    plain, none = plan_schedule(TrainConfig(warmup_ratio=0.1), 10_000, 10, 64)
    assert plain.warmup_steps == 100 and not none


def test_explicit_warmup_steps_win() -> None:
    s, _ = plan_schedule(TrainConfig(warmup_steps=7, max_steps=50), 10, 1, 8)
    assert s.warmup_steps == 7 and s.total_steps == 50
