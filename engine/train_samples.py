"""Samples during training (`train.sample_every`, like nanoGPT's): every N steps, a short text from
the model being trained, as a `sample` event in the run log, the dashboard and the report.

Cheap when on and nothing when off. Rank 0 alone generates, between optimizer steps, with the
backend's own generation (the KV cache, `sample_tokens` new tokens); the model goes back to training
mode and every RNG the run draws from is restored afterwards, so a run with samples trains exactly
the run without them, and resumes the same. Each sample is drawn with the run's seed: the same
random numbers at every step, so differences between samples are the model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine import protocol as P
from engine.backends.base import Backend
from engine.config import TrainConfig
from engine.errors import UserError
from engine.run_log import RunLog

DEFAULT_TOKENS = 48  # short: a glimpse of the model, not a benchmark


class TrainingSamples:
    """The loop's one hook for samples: `after_step` at each optimizer-step boundary."""

    def __init__(self, t: TrainConfig, backend: Backend, *, tokenizer_dir: Path, eos_id: int, context: int,
                 log: RunLog) -> None:
        self.every, self.backend, self.log = t.sample_every, backend, log
        self.prompt = t.sample_prompt or ""
        tokens = t.sample_tokens or max(1, min(DEFAULT_TOKENS, context // 2))
        self.params = P.SamplingParams(max_new_tokens=tokens, temperature=t.sample_temperature, seed=t.seed)
        self.generate: Callable[[str, P.SamplingParams], tuple[str, int]] | None = None
        if not self.every:
            return
        if tokens >= context:
            raise UserError(f"train.sample_tokens ({t.sample_tokens}) must leave room for a prompt in this cache's "
                            f"sequences of {context} tokens")
        self.generate = backend.sampler(tokenizer_dir, eos_id, context) if backend.dist.is_main else None

    def after_step(self, step: int) -> None:
        if self.generate is None or step % self.every:
            return
        rng = self.backend.rng_state()
        started = time.perf_counter()
        try:
            text, new_tokens = self.generate(self.prompt, self.params)
        finally:
            self.backend.set_rng_state(rng)
        self.log.emit(P.TrainingSample(step=step, prompt=self.prompt, text=text, new_tokens=new_tokens,
                                       seconds=time.perf_counter() - started))
