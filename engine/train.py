"""The training loop: plan, data order, growth, control, save cadence and events, for any backend.

Everything the loop needs to continue exactly is a handful of numbers (step, epoch, cursor, growth
events, schedule anchors) plus the weights, the optimizer state and the RNG states, all saved at an
optimizer-step boundary. A resume rebuilds the same objects from a checkpoint and enters the same
`Trainer.run`; nothing is replayed (engine.assemble builds both).

Per step the loop touches the host only to hand over rows, read while the step before ran
(engine.prefetch); loss and grad norm stay on the device until a log step, and control commands are polled between steps (rank 0 reads them, every
rank agrees through one tiny all-reduce when distributed). The framework behind the step is a
Backend (engine.backends); this module imports none.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import psutil

from engine import oom
from engine import protocol as P
from engine.atomic import atomic_write_json
from engine.backends.base import Backend, DeviceOutOfMemory, StepResult
from engine.catalog import checkpoint_dirs, display_name
from engine.checkpoint import NonFiniteWeights
from engine.config import RunConfig
from engine.control import EngineLock, poll_commands
from engine.data import DataOrder, rank_slice, read_flags, read_sequences, split_ids
from engine.elastic import Elastic
from engine.errors import UserError
from engine.faults import Faults
from engine.guard import DivergenceGuard
from engine.paths import Layout
from engine.prefetch import RowPrefetcher
from engine.run_log import EventSink, RunLog
from engine.schedule import Schedule, total_steps
from engine.state import (
    TRAINER_STATE_FORMAT, CacheRecord, Fallback, GuardRecord, PlanRecord, RngState, RunFile, RunRecord, ScalerState,
    TrainerState, read_file,
)
from engine.token_flags import trained_tokens
from engine.train_samples import TrainingSamples


# --- what a run starts from ----------------------------------------------------------------------


@dataclass
class Options:
    events: bool = False  # JSON events on stdout instead of human lines
    trace_data: str | None = None  # append the sequence ids each rank trains on (audits and tests)
    quiet: bool = False  # nothing on stdout (the run log is written all the same)
    sinks: list[EventSink] = field(default_factory=list)  # more followers of rank 0's events (engine.tracking)


@dataclass
class Start:
    """Where the loop begins: step 0 of a new run, or the state a checkpoint holds."""

    cfg: RunConfig
    model_name: str
    run: int
    schedule: Schedule
    order: DataOrder
    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_eval_loss: float | None = None
    evals_since_best: int = 0
    cache_sequences: int = 0  # cache size the run last knew, for "Dataset expanded: A → B"
    resumed_from: str | None = None
    rng: RngState | None = None
    scaler: ScalerState | None = None
    history: list[RunRecord] = field(default_factory=list)  # run.json "runs" so far
    guard: GuardRecord = field(default_factory=GuardRecord)
    auto_plan: dict[str, Any] | None = None  # the planner's table when `train --auto-plan` chose the settings
    fallback: Fallback | None = None  # run.json's pending fallback, which the config has caught up to


def counters(state: TrainerState) -> dict[str, Any]:
    """The Start fields a checkpoint restores (a resume, and a rollback of the divergence guard)."""
    return dict(schedule=state.plan.schedule, step=state.step, epoch=state.epoch, cursor=state.cursor,
                tokens_seen=state.tokens_seen, best_eval_loss=state.best_eval_loss,
                evals_since_best=state.evals_since_best, cache_sequences=state.cache.total_sequences, rng=state.rng, scaler=state.scaler, guard=state.guard)


class Trainer:
    def __init__(self, start: Start, *, layout: Layout, backend: Backend, cache: Any, checkpointer: Any,
                 log: RunLog, opts: Options) -> None:
        self.s, self.layout, self.backend, self.opts, self.log = start, layout, backend, opts, log
        log.sinks += opts.sinks
        self.dist = backend.dist
        self.cfg, self.t = start.cfg, start.cfg.train
        self.cache, self.ckpt = cache, checkpointer
        self.reader = RowPrefetcher(cache)
        self.global_batch = self.t.micro_batch * self.t.grad_accum * self.dist.world_size
        self.seq_len = cache.seq_len
        self.n_params, self.n_trainable = backend.n_params, backend.n_trainable
        self.samples = TrainingSamples(self.t, backend, tokenizer_dir=cache.tokenizer_dir, eos_id=cache.eos_id,
                                       context=self.seq_len, log=log)
        backend.load_scaler_state(start.scaler)
        self.log.emit(self.plan_event())
        self.check_growth()
        self.replan()
        if self.s.step >= self.s.schedule.total_steps:
            raise UserError(
                f"{self.s.model_name} already finished at step {self.s.step:,} of {self.s.schedule.total_steps:,}; "
                "raise --max-steps or --epochs to train further"
            )
        self.signalled = False
        self.stop_at_checkpoint = False
        self.last_eval: tuple[int, float] | None = None
        self.saved_at_step = -1
        self.last_checkpoint: str | None = start.resumed_from  # the state so far, until a save
        self.known_loss: tuple[int, float] | None = None  # (step, loss): logged, or read for a save
        self.step_loss: Any = None  # the last step's loss, still on the device
        self.guard = DivergenceGuard(self.t, start.guard)
        self.faults = Faults.from_env()
        self.run_entry: RunRecord | None = None

    # --- plan --------------------------------------------------------------------------------
    def plan_total(self) -> int:
        return total_steps(self.t, self.s.order.n_train_sequences, self.global_batch, self.seq_len)

    def replan(self, expanded: tuple[int, int] | None = None) -> None:
        """Recompute the total from the current data and config; keep the LR continuous."""
        sched = self.s.schedule
        new_total = self.plan_total()
        if expanded is not None:
            n_before, n_after = expanded
            self.log.emit(P.Log(message=f"Dataset expanded: {n_before:,} → {n_after:,} sequences"))
        if new_total != sched.total_steps:
            self.log.emit(P.Log(message=f"Using dynamic total steps: {new_total:,} (was {sched.total_steps:,})"))
            self.s.schedule = sched.retotal(self.s.step, new_total)
        if expanded is not None:
            self.log.emit(P.CacheExpanded(
                step=self.s.step, n_before=expanded[0], n_after=expanded[1],
                total_steps_before=sched.total_steps, total_steps_after=new_total))
        if expanded is not None or new_total != sched.total_steps:
            self.log.emit(self.plan_event(previous=sched.total_steps))

    def plan_event(self, previous: int | None = None) -> P.Plan:
        sched = self.s.schedule
        return P.Plan(
            total_steps=sched.total_steps, warmup_steps=sched.warmup_steps,
            n_sequences=self.s.order.n_train_sequences, global_batch=self.global_batch,
            tokens_per_step=self.global_batch * self.seq_len, epochs=self.t.epochs,
            epoch_fraction=self.t.epoch_fraction, schedule=sched.kind,
            previous_total_steps=previous, n_params=self.n_params,
            n_trainable=self.n_trainable if self.n_trainable != self.n_params else None,
        )

    def check_growth(self) -> None:
        """Pick up chunks a concurrent `cache build` committed; rank 0 decides for every rank."""
        info = None
        if self.dist.is_main:
            self.cache.refresh()
            new = {str(c): n for c, n in self.cache.chunk_sizes.items() if c not in self.s.order.chunk_sizes}
            info = {"new": new, "generation": self.cache.generation, "n": self.cache.n_sequences}
        info = self.backend.broadcast(info)
        if not info["new"]:
            return
        if not self.dist.is_main:
            self.cache.refresh()
        n_before = self.s.cache_sequences
        self.s.order.grow(self.s.epoch, self.s.cursor, {int(c): n for c, n in info["new"].items()},
                          info["generation"], n_before, info["n"])
        self.s.cache_sequences = info["n"]
        self.replan(expanded=(n_before, info["n"]))

    # --- checkpoint state --------------------------------------------------------------------
    def cache_record(self) -> CacheRecord:
        c, order = self.cache, self.s.order
        return CacheRecord(
            dataset_name=c.dataset_name, path=str(c.path), total_sequences=self.s.cache_sequences,
            sequence_length=c.seq_len, generation=c.generation, manifest_hash=c.manifest_hash(),
            tokenizer_sha256=c.tokenizer_sha256, consumed_manifest_hash=c.manifest_hash(order.known_chunks),
            dtype=str(c.dtype), vocab_size=c.vocab_size,
        )

    def trainer_state(self, loss: float | None) -> TrainerState:
        s, backend = self.s, self.backend
        return TrainerState(
            format=TRAINER_STATE_FORMAT, model_name=s.model_name, display_name=display_name(s.model_name, s.step, s.run),
            step=s.step, run=s.run, tokens_seen=s.tokens_seen, loss=loss, eval_loss=self.eval_at(s.step),
            best_eval_loss=s.best_eval_loss, evals_since_best=s.evals_since_best, saved_at=time.time(), elapsed_s=s.elapsed_s, epoch=s.epoch,
            cursor=s.cursor, growth_events=[e.to_dict() for e in s.order.events], data=s.order.state(),
            plan=PlanRecord(schedule=s.schedule, global_batch=self.global_batch, n_sequences=s.order.n_train_sequences),
            total_steps=s.schedule.total_steps, scaler=backend.scaler_state(), rng=backend.rng_state(),
            cache=self.cache_record(), config_hash=self.cfg.hash(), world_size=self.dist.world_size,
            global_batch=self.global_batch, precision=backend.precision, versions=backend.versions(),
            backend=backend.name, guard=s.guard,
        )

    def eval_at(self, step: int) -> float | None:
        return self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None

    def loss_now(self) -> float:
        """The loss at the current step: its logged value, else this step's own, read here (one sync
        and one all-reduce, so only at a save or the finish, never per step). Every rank calls it."""
        if self.known_loss is None or self.known_loss[0] != self.s.step:
            (total,) = self.backend.all_reduce_sum(self.backend.to_host([self.step_loss]))
            self.known_loss = (self.s.step, total / self.dist.world_size)
        return self.known_loss[1]

    def save(self) -> None:
        if self.saved_at_step == self.s.step:
            return
        self.saved_at_step = self.s.step
        loss = self.loss_now()
        saved = None
        with self.backend.full_state():  # every rank: a sharded model gathers onto rank 0, which alone writes
            if self.dist.is_main:
                try:
                    saved = self.ckpt.save(step=self.s.step, backend=self.backend,
                                           trainer_state=self.trainer_state(loss).to_dict(),
                                           tokenizer_dir=self.cache.tokenizer_dir, eval_loss=self.eval_at(self.s.step))
                except NonFiniteWeights as e:
                    self.log.emit(P.Warning(message=f"{e}; the last checkpoint is still {self.last_checkpoint or 'none'}"))
        self.backend.barrier()
        if saved is None:
            return
        self.last_checkpoint = saved.display_name
        self.log.emit(P.CheckpointSaved(step=self.s.step, path=str(saved.path), display_name=saved.display_name,
                                        loss=loss, seconds=saved.seconds, bytes=saved.bytes))

    # --- eval ----------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        ids = self.s.order.eval_ids(self.t.eval_batches * self.t.micro_batch)
        if len(ids) == 0:
            return None
        mine = ids[self.dist.rank::self.dist.world_size]
        total, count = 0.0, 0
        # Every rank runs as many forwards (a sharded model's are collectives); a rank out of rows
        # repeats one with weight 0.
        for i in range(0, -(-len(ids) // self.dist.world_size), self.t.micro_batch):
            part = mine[i:i + self.t.micro_batch]
            read = part if len(part) else ids[:1]
            rows, flags = read_sequences(self.cache, read), read_flags(self.cache, read)
            loss = self.backend.eval_loss(rows, flags)
            if len(part):
                weight = len(rows) if flags is None else trained_tokens(flags)  # a mean over trained targets
                total += loss * weight
                count += weight
        total, count = self.backend.all_reduce_sum([total, float(count)])
        loss = total / max(count, 1.0)
        self.last_eval = (self.s.step, loss)
        if self.s.best_eval_loss is None or loss < self.s.best_eval_loss:
            self.s.best_eval_loss, self.s.evals_since_best = loss, 0
        else:
            self.s.evals_since_best += 1
        self.log.emit(P.Eval(step=self.s.step, loss=loss, perplexity=math.exp(min(loss, 700.0))))
        return loss

    # --- control -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signalled:  # a second Ctrl-C means now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signalled = True

    def control(self) -> tuple[bool, bool, bool, bool, bool]:
        """(stop, save, pause, resume, stop_at_checkpoint) as every rank agrees on them."""
        cmds = [c.command for c in poll_commands(self.layout, self.s.model_name)] if self.dist.is_main else []
        flags = [self.signalled or "stop" in cmds, "save" in cmds, "pause" in cmds, "resume" in cmds,
                 "stop_at_checkpoint" in cmds]
        return tuple(self.backend.any_flags(flags))  # type: ignore[return-value]

    def pause(self) -> bool:
        """Hold between steps until resumed (saving on request meanwhile); True if a stop arrived."""
        self.log.emit(P.State(state="paused", reason="requested"))
        while True:
            time.sleep(0.2)
            stop, save, _, resume, stop_at_ckpt = self.control()
            self.stop_at_checkpoint |= stop_at_ckpt
            if save:
                self.save()
            if stop:
                return True
            if resume:
                self.log.emit(P.State(state="running", reason="resumed"))
                return False

    # --- the loop ------------------------------------------------------------------------------
    def trace(self, ids: np.ndarray) -> None:
        if not self.opts.trace_data:
            return
        path = self.opts.trace_data + (f".rank{self.dist.rank}" if self.dist.enabled else "")
        chunks, rows = split_ids(ids)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.s.step, "epoch": self.s.epoch,
                                "ids": [[int(c), int(r)] for c, r in zip(chunks, rows)]}) + "\n")

    def run(self) -> int:
        s, dist = self.s, self.dist
        lock = EngineLock(self.layout, s.model_name)
        log_path = self.layout.run_log(s.model_name, s.run)
        if dist.is_main:
            lock.acquire(s.run, log_path)
        previous: dict[int, Any] = {}
        try:
            # Before the run announces itself: a viewer that sees the header may signal at once,
            # and that must mean "save and stop", not the default instant death.
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
            if dist.is_main:
                self.run_entry = RunRecord(
                    run=s.run, started=time.time(), start_step=s.step, resumed_from=s.resumed_from,
                    log=str(log_path.relative_to(self.layout.root)), world_size=dist.world_size,
                    precision=self.backend.precision, hardware=self.hardware(), auto_plan=s.auto_plan,
                )
                self.write_run_json()
                self.log.attach(log_path, self.header())
                if s.fallback is not None:  # as this start caught up to it (engine.oom.catch_up)
                    self.announce(replace(s.fallback, micro_batch=self.t.micro_batch, grad_accum=self.t.grad_accum,
                                          grad_checkpointing=self.t.grad_checkpointing))
                    self.write_run_json()
            self.backend.barrier()  # run.json names this run before any rank can hand an OOM over to it
            if s.rng is not None:
                self.backend.set_rng_state(s.rng)
            self.log.emit(P.State(state="running", reason="started"))
            return self.loop()
        except Exception as e:  # the log says how the run ended; the CLI reports the error itself
            self.log.emit(P.Error(message=str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
            self.log.emit(P.Finished(step=s.step, reason="error", checkpoint=self.last_checkpoint))
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.reader.close()
            self.log.close()
            if dist.is_main:
                lock.release()

    def loop(self) -> int:
        s, t, dist, backend = self.s, self.t, self.dist, self.backend
        losses: list[Any] = []  # device scalars of the steps since the last log line
        excluded, paused = 0.0, 0.0  # excluded: eval, saves, control, pauses
        t_log = time.perf_counter()
        while s.step < s.schedule.total_steps:
            lr = s.schedule.lr(s.step) * s.guard.lr_scale
            ids, next_epoch, next_cursor = s.order.take(s.epoch, s.cursor, self.global_batch)
            mine = rank_slice(ids, dist.rank, dist.world_size)
            self.trace(mine)
            rows, flags = self.reader.rows(mine)
            if s.step + 1 < s.schedule.total_steps:  # what the next step reads, unless growth changes it
                ahead, _, _ = s.order.take(next_epoch, next_cursor, self.global_batch)
                self.reader.start(rank_slice(ahead, dist.rank, dist.world_size))
            log_now = (s.step + 1) % t.log_interval == 0 or s.step + 1 == s.schedule.total_steps
            result = self.train_step(rows, flags, lr, log_now)
            self.reader.settle()
            if not result.skipped:
                losses.append(result.loss)
            self.step_loss = result.loss
            s.step += 1
            s.epoch, s.cursor = next_epoch, next_cursor
            s.tokens_seen += self.global_batch * self.seq_len
            if self.guard.observe(result.skipped):
                self.rollback()
                losses = []
                continue

            if log_now:  # the one host sync per log interval (a guarded step also reads one flag)
                has_norm = result.grad_norm is not None
                host = backend.to_host((losses or [result.loss]) + ([result.grad_norm] if has_norm else []))
                grad_norm = host.pop() if has_norm else 0.0
                (mean_loss,) = backend.all_reduce_sum([sum(host) / len(host)])
                self.known_loss = (s.step, mean_loss / dist.world_size)
                now = time.perf_counter()
                train_time = max(now - t_log - excluded, 1e-9)
                s.elapsed_s += now - t_log - paused
                self.log.emit(self.step_event(self.known_loss[1], lr, grad_norm, len(host), train_time))
                losses = []
                excluded, paused, t_log = 0.0, 0.0, time.perf_counter()
            t_boundary = time.perf_counter()
            self.samples.after_step(s.step)
            done = s.step >= s.schedule.total_steps
            if s.order.eval_chunks and (s.step % t.eval_interval == 0 or done):
                self.evaluate()
                if t.early_stop_patience and s.evals_since_best == 0:
                    self.save()  # a new best: its weights are kept (rotation spares the best) whatever follows
                if t.early_stop_patience and s.evals_since_best >= t.early_stop_patience and not done:
                    self.log.info(f"Early stop: no better eval loss in {s.evals_since_best} evals "
                                  f"(best {s.best_eval_loss:.4f})")
                    return self.finish("early_stopped")
            if s.step % t.save_interval == 0 or done:
                self.save()
                if self.stop_at_checkpoint:
                    return self.finish("stopped")
            if t.growth_check_interval and s.step % t.growth_check_interval == 0 and not done:
                self.check_growth()
            stop, save, pause, _, stop_at_ckpt = self.control()
            self.stop_at_checkpoint |= stop_at_ckpt
            if stop_at_ckpt:
                self.log.emit(P.State(state="stopping", reason="at the next checkpoint"))
            if save:
                self.save()
            if pause and not stop:
                t_pause = time.perf_counter()
                stop = self.pause()
                paused += time.perf_counter() - t_pause  # neither training time nor elapsed time
            if stop and not done:
                self.log.emit(P.State(state="stopping", reason="signal" if self.signalled else "requested"))
                self.save()
                return self.finish("stopped")
            excluded += time.perf_counter() - t_boundary
        return self.finish("completed")

    # --- surviving: the OOM ladder and the divergence guard ----------------------------------------
    def train_step(self, rows: np.ndarray, flags: np.ndarray | None, lr: float, want_norm: bool) -> StepResult:
        """One optimizer step, down the OOM ladder (engine.oom) as far as it takes to fit."""
        t = self.t
        poison = self.faults.nan(self.s.step + 1)
        while True:
            try:
                return self.backend.train_step(rows, lr, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                               grad_clip=t.grad_clip, want_norm=want_norm, flags=flags,
                                               guard=self.guard.on, poison=poison)
            except DeviceOutOfMemory as e:
                self.fall_back(e)

    def fall_back(self, error: DeviceOutOfMemory) -> None:
        """Take the next rung of the ladder, or save and stop at its top (under torchrun the other
        ranks wait in a collective for this one: no save, and the rung goes to a restart)."""
        failed, at = oom.settings(self.t), self.s.step + 1
        rung = oom.climb(self.t, self.backend)
        if rung is None:
            if not self.dist.enabled and self.step_loss is not None:  # else the run's start holds its state
                self.save()
            raise UserError(f"out of device memory at step {at:,} with {failed}, and no fallback keeps the "
                            f"same computation ({error}); use a smaller model or seq_len, or a device with "
                            "more memory", exit_code=1)
        fallback = Fallback(step=self.s.step, micro_batch=rung.micro_batch, grad_accum=rung.grad_accum,
                            grad_checkpointing=rung.grad_checkpointing,
                            message=f"Out of memory at step {at:,} with {failed}: {rung.change} (same global batch)")
        if self.dist.enabled:
            self.hand_over(fallback)
        self.announce(fallback)
        self.write_run_json()  # a resume trains with what fits

    def announce(self, fallback: Fallback) -> None:
        """The event and the history entry of a rung this run trains with."""
        self.log.emit(P.OomFallback(step=fallback.step, micro_batch=fallback.micro_batch,
                                    grad_accum=fallback.grad_accum, grad_checkpointing=fallback.grad_checkpointing,
                                    message=fallback.message))
        if self.run_entry is not None:
            self.run_entry.fallbacks.append(fallback)

    def hand_over(self, fallback: Fallback) -> NoReturn:
        """Under torchrun the group cannot go on with one rank changed, nor save (a collective):
        this rank records the rung as run.json's pending fallback, for the run's next start to begin
        with, and exits. The steps since the last checkpoint are computed again."""
        elastic, name = Elastic.from_env(), self.s.model_name
        path = self.layout.run_json(name)
        run_file = RunFile.from_dict(read_file(path), path)
        run_file.config, run_file.pending_fallback = self.cfg.to_dict(), replace(fallback, job=elastic.job)
        atomic_write_json(path, run_file.to_dict())
        fits = oom.settings(self.t)
        if elastic.restarts_left > 0:
            then = f"torchrun restarts the group, which continues with {fits}"
        else:
            again = (f"`packtrain-engine resume {name}` under torchrun continues from its last checkpoint"
                     if checkpoint_dirs(self.layout.model_dir(name)) else "the same `train` command starts it again")
            then = (f"the group stops: {again} with {fits} (torchrun --max-restarts N restarts the group "
                    "by itself)")
        raise UserError(f"{fallback.message}; {then}", exit_code=1)

    def rollback(self) -> None:
        """Back to the newest checkpoint from before the non-finite steps began, at a lower LR
        (engine.guard); one saved during them holds the same weights but has skipped their data."""
        s, streak = self.s, self.guard.streak
        path = self.ckpt.newest_valid(at_most=s.step - streak) if self.dist.is_main else None
        path = self.backend.broadcast(None if path is None else str(path))
        if path is None or self.guard.hopeless:
            why = ("no checkpoint to go back to" if path is None
                   else f"{self.guard.futile} rollbacks in a row changed nothing")
            raise UserError(f"training diverged: {streak} steps in a row up to step {s.step:,} had a non-finite "
                            f"loss or gradient norm and {why}; lower --lr or check the data", exit_code=1)
        diverged_at = s.step
        state = self.ckpt.load(Path(path), self.backend)
        for key, value in counters(state).items():
            if key != "guard":  # the run's own counts carry on; the checkpoint's are older
                setattr(s, key, value)
        s.order = DataOrder.restore(state.data, state.growth_events, self.cache.chunk_sizes)
        self.backend.set_rng_state(state.rng)
        self.backend.load_scaler_state(state.scaler)
        self.guard.rolled_back()
        self.known_loss, self.last_eval = None, None
        self.saved_at_step = -1  # the replayed steps save again, over the abandoned timeline's saves
        self.log.emit(P.DivergenceRollback(
            step=diverged_at, to_step=s.step, skipped=streak, lr_scale=s.guard.lr_scale,
            message=f"Diverged: {streak} non-finite steps in a row up to step {diverged_at:,}; rolled back to "
                    f"step {s.step:,}, LR x{s.guard.lr_scale:g} from now on"))
        self.check_growth()

    def step_event(self, loss: float, lr: float, grad_norm: float, steps: int, train_time: float) -> P.Step:
        s = self.s
        total = s.schedule.total_steps
        memory = self.backend.memory()
        return P.Step(
            step=s.step, total_steps=total, loss=loss, lr=lr, grad_norm=grad_norm,
            tokens_per_sec=steps * self.global_batch * self.seq_len / train_time,
            eta_s=(total - s.step) * train_time / steps, progress_pct=100.0 * s.step / total,
            rss_gb=memory.rss_gb, device_mem_gb=memory.device_gb, epoch=s.epoch,
            tokens_seen=s.tokens_seen, skipped_steps=s.guard.skipped_steps,
        )

    def finish(self, reason: str) -> int:
        self.save()
        self.log.emit(P.Finished(step=self.s.step, reason=reason, final_loss=self.loss_now(),  # type: ignore[arg-type]
                                 checkpoint=self.last_checkpoint))
        return 0

    # --- run records -----------------------------------------------------------------------------
    def hardware(self) -> dict[str, Any]:
        return {**self.backend.facts(self.layout), "backend": self.backend.name}

    def header(self) -> P.RunStarted:
        s = self.s
        return P.RunStarted(
            model=s.model_name, run=s.run, start_step=s.step, total_steps=s.schedule.total_steps,
            target_tokens=s.schedule.total_steps * self.global_batch * self.seq_len, resumed_from=s.resumed_from,
            pid=psutil.Process().pid, world_size=self.dist.world_size, config=self.cfg.to_dict(),
            hardware={**self.hardware(), "precision": self.backend.precision, "n_params": self.n_params,
                      "n_trainable": self.n_trainable},
        )

    def write_run_json(self) -> None:
        """run.json: the config as the run trains now (after any OOM fallback) and its history; a
        pending fallback is this run's from its start, so it is pending no more. Rank 0 writes."""
        assert self.run_entry is not None
        run_file = RunFile(config=self.cfg.to_dict(), runs=self.s.history + [self.run_entry])
        atomic_write_json(self.layout.run_json(self.s.model_name), run_file.to_dict())
