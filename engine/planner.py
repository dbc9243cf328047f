"""The planner: choose how a step is computed by measuring, not guessing.

Every candidate computes the same thing (micro-batch x gradient accumulation at the run's global
batch, with or without gradient checkpointing, compiled or not), so the choice changes speed and
memory, never the run. Each is built fresh from the run's own config and cache and trained for a
few steps on the run's first rows: tok/s over the timed steps, and peak memory (the device's peak
on CUDA, MPS or Metal; growth of the process's RSS on a CPU). A candidate above `margin` of the
memory limit is rejected, as is one that runs out of memory; the fastest of the rest wins.
`packtrain-engine plan` prints the table; `train --auto-plan` trains with the winner and records
the table in run.json. Framework-free: backends are loaded by name (engine.backends).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from engine.assemble import open_backend, open_cache, run_log, token_ids
from engine.backends.base import Backend, DeviceOutOfMemory
from engine.config import RunConfig, TrainConfig
from engine.data import DataOrder, read_sequences, rows_in_budget
from engine.errors import UserError
from engine.model_config import llama_config
from engine.oom import smallest_factor
from engine.paths import Layout
from engine.train import Options
from engine.units import format_bytes

MARGIN = 0.8  # of the memory limit a candidate may use
STEPS = 3  # timed steps per candidate, after one untimed warm-up (allocation, compilation)
MICRO_BATCHES = {"cpu": 3}  # micro-batch sizes tried per device kind; elsewhere DEFAULT_MICRO_BATCHES
DEFAULT_MICRO_BATCHES = 5
SETTINGS = ("micro_batch", "grad_accum", "grad_checkpointing", "compile")


@dataclass(frozen=True)
class Candidate:
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    compile: bool

    def apply(self, t: TrainConfig) -> TrainConfig:
        return replace(t, **asdict(self))

    def describe(self) -> str:
        return (f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum}, gradient checkpointing "
                f"{'on' if self.grad_checkpointing else 'off'}, compile {'on' if self.compile else 'off'}")


@dataclass
class Trial:
    candidate: Candidate
    tokens_per_sec: float | None = None
    peak_gb: float | None = None
    verdict: str = "ok"  # ok | over the memory margin | out of memory | failed: <why>

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


@dataclass
class PlanResult:
    backend: str
    device: str
    precision: str
    global_batch: int
    seq_len: int
    limit_gb: float
    margin: float
    steps: int
    memory: str  # what peak_gb measures
    trials: list[Trial] = field(default_factory=list)

    @property
    def ranked(self) -> list[Trial]:
        """Accepted trials fastest first, then the rejected in the order they ran."""
        ok = sorted((t for t in self.trials if t.ok), key=lambda t: -(t.tokens_per_sec or 0.0))
        return ok + [t for t in self.trials if not t.ok]

    @property
    def winner(self) -> Candidate | None:
        best = self.ranked[:1]
        return best[0].candidate if best and best[0].ok else None

    def to_dict(self) -> dict[str, Any]:
        winner = self.winner
        return {**{k: v for k, v in asdict(self).items() if k != "trials"},
                "trials": [{**asdict(t.candidate), "tokens_per_sec": t.tokens_per_sec, "peak_gb": t.peak_gb,
                            "verdict": t.verdict} for t in self.ranked],
                "winner": None if winner is None else asdict(winner)}


def candidates(t: TrainConfig, backend: Backend) -> list[Candidate]:
    """Micro-batch splits of the configured per-process batch (largest first), times gradient
    checkpointing and compile where the backend has them (compile on CUDA only: elsewhere its
    compile time outweighs a short run's gain)."""
    batch = t.micro_batch * t.grad_accum
    micro, sizes = batch, []
    for _ in range(MICRO_BATCHES.get(backend.device, DEFAULT_MICRO_BATCHES)):
        sizes.append(micro)
        if micro == 1:
            break
        micro //= smallest_factor(micro)
    checkpointing = (False, True) if backend.name == "torch" else (False,)
    compiling = (False, True) if backend.name == "torch" and backend.device == "cuda" else (False,)
    return [Candidate(m, batch // m, gc_on, compiled) for compiled in compiling for gc_on in checkpointing
            for m in sizes]


def plan(cfg: RunConfig, layout: Layout, *, steps: int = STEPS, margin: float = MARGIN, workers: int | None = None,
         opts: Options | None = None) -> PlanResult:
    """Measure every candidate for `cfg` (its cache built first if missing, as `train` does)."""
    cfg.validate()
    first, _ = open_backend(cfg, layout)
    if first.dist.enabled:
        raise UserError("plan measures in one process; run it without torchrun")
    log = run_log(opts or Options(), True)
    cache = open_cache(cfg, layout, first, log, workers=workers)
    order = DataOrder.start(cfg.train.seed, cache.chunk_sizes, cfg.data.eval_chunks,
                            rows_in_budget(cache.cache_bytes, cache.seq_len, cache.dtype))
    batch = cfg.train.micro_batch * cfg.train.grad_accum
    if batch > order.n_train_sequences:
        raise UserError(f"a step needs {batch:,} sequences but {cache.path} holds only {order.n_train_sequences:,}")
    rows = read_sequences(cache, order.take(0, 0, batch)[0])
    model = llama_config(cfg.model, cache.vocab_size, cache.seq_len, token_ids(cache))
    result = PlanResult(backend=first.name, device=first.device, precision=first.precision, global_batch=batch,
                        seq_len=cache.seq_len, limit_gb=first.memory_limit_gb(), margin=margin, steps=steps,
                        memory="device peak" if first.device != "cpu" else "RSS growth")
    todo = candidates(cfg.train, first)
    del first
    for candidate in todo:
        trial = measure(cfg, layout, candidate, model, rows, steps, result)
        result.trials.append(trial)
        measured = (f"{trial.tokens_per_sec:,.0f} tok/s, {format_bytes(trial.peak_gb * 1e9)}"
                    if trial.tokens_per_sec is not None and trial.peak_gb is not None else "")
        log.info(f"Planner: {candidate.describe()}: {measured}" + ("" if trial.ok else f" ({trial.verdict})"))
    return result


def measure(cfg: RunConfig, layout: Layout, candidate: Candidate, model: dict[str, Any], rows: Any, steps: int,
            result: PlanResult) -> Trial:
    trial = Trial(candidate)
    t = candidate.apply(cfg.train)
    trial_cfg = replace(cfg, train=t)
    rss_before = psutil.Process().memory_info().rss
    backend, _ = open_backend(trial_cfg, layout)
    try:
        backend.build(model, t)
        backend.reset_peak_memory()

        def step() -> None:
            r = backend.train_step(rows, t.lr, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                   grad_clip=t.grad_clip, want_norm=False)
            backend.to_host([r.loss])  # wait for the device: the time is the step's, not its queueing

        step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - started
        trial.tokens_per_sec = steps * result.global_batch * result.seq_len / seconds
        trial.peak_gb = (backend.memory().device_gb if result.device != "cpu"
                         else max(0, psutil.Process().memory_info().rss - rss_before) / 1e9)
        if trial.peak_gb > margin_gb(result):
            trial.verdict = "over the memory margin"
    except DeviceOutOfMemory:
        trial.verdict = "out of memory"
    except Exception as e:  # noqa: BLE001 - a candidate the framework cannot run (compile) is a rejected row
        trial.verdict = f"failed: {' '.join(str(e).split())[:120] or type(e).__name__}"
    finally:
        backend.release_memory()
        del backend
        if result.device != "cpu":  # the model's reference cycles hold device memory until collected (~1 s)
            gc.collect()
    return trial


def margin_gb(result: PlanResult) -> float:
    return result.limit_gb * result.margin


def table(result: PlanResult) -> str:
    """The ranked table `plan` prints."""
    head = (f"Plan: {result.backend} on {result.device} ({result.precision}), global batch {result.global_batch} "
            f"x {result.seq_len} tokens, {result.steps} timed steps each; memory is {result.memory}, limit "
            f"{format_bytes(result.limit_gb * 1e9)}, margin {result.margin:.0%} ({format_bytes(margin_gb(result) * 1e9)})")
    lines = [head, f"{'rank':>4}  {'micro x accum':>13}  {'ckpt':>4}  {'compile':>7}  {'tok/s':>10}  {'memory':>9}  verdict"]
    for i, trial in enumerate(result.ranked, 1):
        c = trial.candidate
        speed = f"{trial.tokens_per_sec:,.0f}" if trial.tokens_per_sec else "-"
        memory = format_bytes(trial.peak_gb * 1e9) if trial.peak_gb is not None else "-"
        lines.append(f"{i if trial.ok else '-':>4}  {f'{c.micro_batch} x {c.grad_accum}':>13}  "
                     f"{'on' if c.grad_checkpointing else 'off':>4}  {'on' if c.compile else 'off':>7}  "
                     f"{speed:>10}  {memory:>9}  {trial.verdict}")
    winner = result.winner
    lines.append(f"Winner: {winner.describe()}" if winner else "No candidate fits: every one was rejected")
    return "\n".join(lines)


def choose(cfg: RunConfig, result: PlanResult) -> RunConfig:
    """`cfg` with the winner's settings; refused when nothing fits."""
    winner = result.winner
    if winner is None:
        raise UserError(f"no candidate setting fits within {result.margin:.0%} of {format_bytes(result.limit_gb * 1e9)} "
                        f"({result.memory}); use a smaller model, seq_len or batch", exit_code=1)
    cfg.train = winner.apply(cfg.train)
    return cfg
