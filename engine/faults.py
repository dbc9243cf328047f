"""Fault hooks for tests: make a real run meet the failures its safety nets exist for.

An OOM needs a GPU at its limit and a divergence a bad batch or learning rate; neither is something
a test on a CPU can arrange. `PACKTRAIN_FAULTS` asks the engine to fake them at the point where the
real failure happens, through the real failure's path (the framework's own OOM error, a NaN loss):

    PACKTRAIN_FAULTS="oom_above=2"        every micro-batch of more than 2 rows raises the backend's OOM
    PACKTRAIN_FAULTS="nan_at=5,6,7"       steps 5, 6 and 7 (the step events' numbers) compute a NaN loss
    PACKTRAIN_FAULTS="oom_above=2;nan_at=5"

A NaN step fires once: the steps a rollback replays compute normally, as a transient fault would.
Unset (always, outside tests), nothing here costs anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV = "PACKTRAIN_FAULTS"


@dataclass
class Faults:
    oom_above: int | None = None
    nan_at: set[int] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> "Faults":
        faults = cls()
        for part in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(";"))):
            key, _, value = part.partition("=")
            if key == "oom_above":
                faults.oom_above = int(value)
            elif key == "nan_at":
                faults.nan_at = {int(v) for v in value.split(",") if v}
            else:
                raise ValueError(f"{ENV}: unknown fault {key!r} (oom_above=N, nan_at=S1,S2,...)")
        return faults

    def oom(self, micro_batch: int) -> bool:
        """Whether a micro-batch of this many rows is to run out of memory."""
        return self.oom_above is not None and micro_batch > self.oom_above

    def nan(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is to compute a NaN loss; each fires once."""
        if step not in self.nan_at:
            return False
        self.nan_at.discard(step)
        return True
