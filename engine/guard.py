"""The divergence guard: a non-finite step never reaches the weights, and a run that keeps
producing them goes back to its last checkpoint with a lower learning rate.

The backend checks each step's loss and gradient norm before the optimizer moves (one host read
per step) and skips the update when either is NaN or infinite; the data of that step is consumed
all the same. `patience` such steps in a row mean the run has diverged, not met one bad batch: the
loop restores the newest checkpoint at or before the current step and multiplies the LR by
`lr_factor` from then on. The counts and the LR scale live in trainer_state.json (GuardRecord), so
a resume carries on with the lowered LR. Checkpoints themselves refuse non-finite weights
(engine.checkpoint), so the one a rollback finds is sound.
"""

from __future__ import annotations

from engine.config import TrainConfig
from engine.state import GuardRecord

FUTILE_ROLLBACKS = 3  # rollbacks in a row with no finite step between them: the LR is not the problem


class DivergenceGuard:
    def __init__(self, t: TrainConfig, record: GuardRecord) -> None:
        self.patience, self.lr_factor, self.record = t.divergence_patience, t.divergence_lr_factor, record
        self.streak = 0  # non-finite steps in a row
        self.futile = 0  # rollbacks since the last finite step

    @property
    def on(self) -> bool:
        return self.patience > 0

    def observe(self, skipped: bool) -> bool:
        """Count one step; True when it completes `patience` non-finite steps in a row."""
        if not skipped:
            self.streak = self.futile = 0
            return False
        self.streak += 1
        self.record.skipped_steps += 1
        return self.streak >= self.patience

    def rolled_back(self) -> None:
        self.streak = 0
        self.futile += 1
        self.record.rollbacks += 1
        self.record.lr_scale *= self.lr_factor

    @property
    def hopeless(self) -> bool:
        """Rolling back again would only repeat itself."""
        return self.futile >= FUTILE_ROLLBACKS
