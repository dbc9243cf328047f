"""The OOM ladder: what a run does when a step runs out of device memory.

Each rung keeps the computation the same, so a run that falls back is the run it would have been,
loss for loss up to float rounding, and a resume after it is exact:

1. split each micro-batch in two (by its smallest factor: halving when it is even) and accumulate
   twice as many: the same rows, the same mean loss, the same gradient per optimizer step;
2. at one row per micro-batch, recompute activations in the backward pass (gradient
   checkpointing) where the backend can;
3. then nothing is left that keeps the math: the run saves and stops, naming what failed.

The ladder changes `train` config fields in place; the loop writes them to run.json, so a resume
trains with the settings that fit. Under torchrun a rank cannot climb alone (the others wait for it
in a collective): it records the rung as run.json's pending fallback and exits, and the run's next
start (torchrun's restart of the group, or a resume) catches up to it. Framework-free: the backend
translates its OOM into DeviceOutOfMemory and turns checkpointing on.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.backends.base import Backend
from engine.config import TrainConfig
from engine.state import Fallback


@dataclass(frozen=True)
class Rung:
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    change: str  # what this rung changed, for the event and the dashboard


def settings(t: TrainConfig) -> str:
    """How a step is computed, as the messages name it."""
    return (f"micro_batch {t.micro_batch} x grad_accum {t.grad_accum}, "
            f"gradient checkpointing {'on' if t.grad_checkpointing else 'off'}")


def smallest_factor(n: int) -> int:
    return next((p for p in range(2, int(n ** 0.5) + 1) if n % p == 0), n)


def split(t: TrainConfig) -> str:
    """The first rung: smaller micro-batches, more of them; what changed, for the message."""
    p = smallest_factor(t.micro_batch)
    change = (f"micro-batch {t.micro_batch} -> {t.micro_batch // p}, "
              f"gradient accumulation {t.grad_accum} -> {t.grad_accum * p}")
    t.micro_batch, t.grad_accum = t.micro_batch // p, t.grad_accum * p
    return change


def climb(t: TrainConfig, backend: Backend) -> Rung | None:
    """Take the next rung for `t` (changing it and the backend), or None at the top of the ladder."""
    if t.micro_batch > 1:
        change = split(t)
    elif not t.grad_checkpointing and backend.enable_grad_checkpointing():
        t.grad_checkpointing = True
        change = "gradient checkpointing on"
    else:
        return None
    return Rung(t.micro_batch, t.grad_accum, t.grad_checkpointing, change)


def catch_up(t: TrainConfig, fallback: Fallback, backend: Backend) -> None:
    """Climb `t` as far as a rung an earlier process took (under torchrun, where it could not go on
    itself). Splitting `t`'s own micro-batch keeps the global batch this start asks for, whatever
    the world size; settings already further up the ladder stay."""
    while t.micro_batch > fallback.micro_batch:
        split(t)
    if fallback.grad_checkpointing and not t.grad_checkpointing:
        t.grad_checkpointing = backend.enable_grad_checkpointing()
