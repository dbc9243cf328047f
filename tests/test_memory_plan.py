"""The memory plan: the 1B preset fits a 24 GB GPU with gradient checkpointing, and the plan's step
memory agrees with what real CPU steps take at small scale."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.memory_plan import GIB, Shapes, largest_micro_batch, plan
from engine.presets import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from memory_plan import measure  # noqa: E402


def test_the_1b_preset_fits_24_gb_with_gradient_checkpointing() -> None:
    s = Shapes.of(PRESETS["1B"], 32768)
    budget = int(22.5 * GIB)  # 24 GB less the CUDA context and allocator slack
    fits = largest_micro_batch(s, seq_len=1024, precision="bf16", budget=budget, checkpointing=True)
    assert fits >= 1
    one = plan(s, seq_len=1024, micro_batch=fits, precision="bf16")
    assert one.total(True) <= budget < plan(s, seq_len=1024, micro_batch=fits + 1, precision="bf16").total(True)
    assert fits > largest_micro_batch(s, seq_len=1024, precision="bf16", budget=budget, checkpointing=False)
    assert one.n_params == PRESETS["1B"].n_params(32768)
    assert one.weights == one.grads == one.adamw // 2 == 4 * one.n_params and one.autocast_copies == 2 * one.n_params


def test_activations_grow_with_tokens_and_checkpointing_keeps_less() -> None:
    s = Shapes.of(PRESETS["124M"], 8192)
    small, big = (plan(s, seq_len=512, micro_batch=mb, precision="fp32") for mb in (2, 8))
    assert big.saved > 3 * small.saved and small.saved_checkpointed < small.saved / 3
    assert big.step_peak(True) < big.step_peak(False)


@pytest.mark.slow
def test_plan_matches_measured_cpu_step_memory() -> None:
    """Loose on purpose: the plan is an upper bound on the backward peak and the allocator rounds."""
    measured = {}
    for gc in (False, True):
        m = measure("5M", vocab=8192, seq_len=128, micro_batch=8, checkpointing=gc)
        assert 0.5 <= m["step_bytes"] / m["planned_step_bytes"] <= 1.3, m
        measured[gc] = m["step_bytes"]
    assert measured[True] < 0.75 * measured[False]
