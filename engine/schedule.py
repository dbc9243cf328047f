"""The training plan (how many optimizer steps) and the learning rate as a pure function of the step.

The LR is never a stateful scheduler object: it is computed from the step and a few anchors that
live in trainer_state.json, so a resumed run gets exactly the LR it would have had, and a run whose
total changes (the cache grew, or the user raised --max-steps) keeps a continuous LR. When the total
changes at step s, the decay progress reached at s is frozen as an anchor and the rest of the decay
is stretched linearly over the new remaining steps (DESIGN §4). Warmup is fixed when the run starts
and never repeated on resume.

Import-light (math only): the TUI can preview a plan without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from engine.config import SCHEDULES, TrainConfig
from engine.errors import UserError


@dataclass(frozen=True)
class Schedule:
    kind: str
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    wsd_decay_ratio: float = 0.2
    # Decay progress is piecewise linear through these (step, progress) points and reaches 1.0 at
    # total_steps. A fresh plan has none (progress 0 at the end of warmup); each change of total
    # adds the point where it happened, so the LR of every past step stays what it was.
    anchors: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        object.__setattr__(self, "anchors", tuple((int(a), float(p)) for a, p in self.anchors))

    def _points(self) -> tuple[tuple[int, float], ...]:
        return ((self.warmup_steps, 0.0),) + self.anchors

    def progress(self, step: int) -> float:
        """Fraction of the decay phase done before optimizer step `step` (0-based), in [0, 1]."""
        points = self._points()
        if step <= points[0][0]:
            return 0.0
        a, p = max((pt for pt in points if pt[0] <= step), key=lambda pt: pt[0])
        later = [pt for pt in points if pt[0] > step]
        b, q = later[0] if later else (self.total_steps, 1.0)
        if b <= a:
            return 1.0
        return min(1.0, p + (q - p) * (step - a) / (b - a))

    def lr(self, step: int) -> float:
        """LR for the update that turns `step` completed steps into step + 1."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / (self.warmup_steps + 1)
        p = self.progress(step)
        top, low = self.peak_lr, self.min_lr
        if self.kind == "constant":
            return top
        if self.kind == "linear":
            return top - (top - low) * p
        if self.kind == "cosine":
            return low + (top - low) * 0.5 * (1.0 + math.cos(math.pi * p))
        stable = 1.0 - self.wsd_decay_ratio  # wsd: hold the peak, then decay linearly at the end
        if p <= stable:
            return top
        return top - (top - low) * (p - stable) / self.wsd_decay_ratio

    def retotal(self, step: int, new_total: int) -> "Schedule":
        """The same curve up to `step`, then the remaining decay stretched over `new_total`."""
        if new_total == self.total_steps:
            return self
        if step <= self._points()[-1][0]:
            # In warmup or at the last anchor: the LR so far does not depend on the total.
            return _replace(self, total_steps=new_total)
        return _replace(self, total_steps=new_total, anchors=self.anchors + ((step, self.progress(step)),))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        return cls(**data)


def _replace(s: Schedule, **changes: object) -> Schedule:
    return Schedule(**{**asdict(s), **changes})


def epoch_steps(epochs: float, epoch_fraction: float, n_sequences: int, global_batch: int) -> int:
    """total_steps = ceil(epochs × epoch_fraction × n_sequences / global_batch)."""
    # Decimal fractions, not floats: 0.3 epochs of 1,000 sequences is exactly 300, never 300.0000001.
    exact = Fraction(repr(epochs)) * Fraction(repr(epoch_fraction)) * n_sequences / global_batch
    return max(1, math.ceil(exact))


def total_steps(t: TrainConfig, n_sequences: int, global_batch: int, seq_len: int) -> int:
    """A step budget wins, then a token budget, else the epoch plan over the training sequences."""
    if t.max_steps is not None:
        return int(t.max_steps)
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / (global_batch * seq_len)))
    return epoch_steps(t.epochs, t.epoch_fraction, n_sequences, global_batch)


def plan_schedule(t: TrainConfig, n_sequences: int, global_batch: int, seq_len: int) -> tuple[Schedule, list[str]]:
    """A fresh schedule and any warnings about it.

    Smart warmup: with an epoch plan and `estimated_total_sequences` (the full dataset while only
    part of it is cached yet), warmup is a ratio of the steps the full dataset will need, so it
    does not shrink to a few steps on a small first slice of the cache.
    """
    total = total_steps(t, n_sequences, global_batch, seq_len)
    budgeted = t.max_steps is not None or t.max_tokens is not None
    if t.warmup_steps is not None:
        warmup = int(t.warmup_steps)
    else:
        basis = total
        if t.estimated_total_sequences and not budgeted:
            basis = epoch_steps(t.epochs, t.epoch_fraction, max(n_sequences, t.estimated_total_sequences), global_batch)
        warmup = int(round(t.warmup_ratio * basis))
    warnings = []
    if warmup >= total:
        warnings.append(
            f"warmup ({warmup:,} steps) is at least the current total ({total:,} steps): the LR never leaves "
            "warmup unless the dataset grows; lower warmup_ratio/warmup_steps or train longer"
        )
    schedule = Schedule(
        kind=t.schedule, peak_lr=t.lr, min_lr=t.lr * t.min_lr_ratio, warmup_steps=warmup,
        total_steps=total, wsd_decay_ratio=t.wsd_decay_ratio,
    )
    return schedule, warnings
