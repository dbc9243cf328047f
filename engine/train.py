"""The training loop, and the setup that makes a new run and a resumed one the same loop.

Everything the loop needs to continue exactly is a handful of numbers (step, epoch, cursor, growth
events, schedule anchors) plus the weights, the optimizer state and the RNG states, all saved at an
optimizer-step boundary. A resume rebuilds the same objects from a checkpoint and enters the same
`Trainer.run`; nothing is replayed.

Per step the loop touches the host only to read the next rows; loss and grad norm stay on the
device until a log step, and control commands are polled between steps (rank 0 reads them, every
rank agrees through one tiny all-reduce when distributed).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from engine import distributed as D
from engine import protocol as P
from engine.atomic import atomic_write_json
from engine.catalog import DISPLAY_RE, display_name
from engine.config import RunConfig
from engine.control import EngineLock, poll_commands
from engine.data import DataOrder, check_resume_cache, rank_slice, read_sequences, rows_in_budget, split_ids
from engine.errors import UserError
from engine.model import build_model, count_params, finish_config, llama_config, lm_loss, param_groups
from engine.names import suggest_names, taken_names, validate_new_name
from engine.paths import Layout, check_name
from engine.precision import choose as choose_precision
from engine.run_log import RunLog
from engine.schedule import Schedule, plan_schedule, total_steps
from engine.state import (
    TRAINER_STATE, TRAINER_STATE_FORMAT, CacheRecord, PlanRecord, RngState, RunFile, RunRecord, ScalerState,
    TrainerState, read_file,
)


# --- device, precision and RNG ---------------------------------------------------------------------


def pick_device(choice: str) -> str:
    """`auto` means CUDA, then MPS, then CPU; an explicit choice that is unavailable is refused."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    if choice == "mps" and not has_mps:
        raise UserError("train.device is mps but MPS is not available")
    return choice


def pick_precision(choice: str, device: str, cfg: RunConfig, layout: Layout) -> str:
    """The policy is engine.precision's; `auto` on a CPU measures the run's own layer shape there."""
    return choose_precision(choice, device, cfg, layout).precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> RngState:
    """Every RNG the run could draw from, as JSON (a torch state tensor becomes a list of ints)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return RngState(
        torch=torch.get_rng_state().tolist(),
        cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        numpy=(np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        random=(py_state[0], list(py_state[1]), py_state[2]),
    )


def _rng_states(state: RngState) -> tuple[torch.Tensor, list[torch.Tensor], tuple, tuple]:
    n, r = state.numpy, state.random
    return (torch.tensor(state.torch, dtype=torch.uint8), [torch.tensor(s, dtype=torch.uint8) for s in state.cuda],
            (n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]), (r[0], tuple(r[1]), r[2]))


def set_rng_state(state: RngState) -> None:
    cpu, cuda, np_state, py_state = _rng_states(state)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():  # one state per device the saving process saw; this one may see fewer
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    np.random.set_state(np_state)
    random.setstate(py_state)


def check_rng_state(state: RngState, source: Path) -> None:
    """Try the saved states on throwaway generators: one that torch, numpy or Python refuses is
    refused here, before the run starts, rather than when it is restored after the run started."""
    key, pos = state.numpy[1], state.numpy[2]
    if len(key) != 624 or not 0 <= pos <= 624:  # numpy accepts any position, then reads past the key
        raise UserError(f"{source}: field 'rng.numpy' is not an MT19937 state (624 words and a position 0-624)")
    try:
        cpu, _, np_state, py_state = _rng_states(state)
        torch.Generator().set_state(cpu)
        np.random.RandomState().set_state(np_state)
        random.Random().setstate(py_state)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise UserError(f"{source}: field 'rng' holds a state the generators refuse: "
                        f"{' '.join(str(e).split())[:120]}") from None
    if state.cuda and torch.cuda.is_available():
        devices = range(min(len(state.cuda), torch.cuda.device_count()))
        if any(len(state.cuda[i]) != torch.cuda.get_rng_state(i).numel() for i in devices):
            raise UserError(f"{source}: field 'rng.cuda' does not hold CUDA generator states")


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# --- what a run starts from ----------------------------------------------------------------------


@dataclass
class Options:
    events: bool = False  # JSON events on stdout instead of human lines
    trace_data: str | None = None  # append the sequence ids each rank trains on (audits and tests)


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
    cache_sequences: int = 0  # cache size the run last knew, for "Dataset expanded: A → B"
    resumed_from: str | None = None
    rng: RngState | None = None
    scaler: ScalerState | None = None
    history: list[RunRecord] = field(default_factory=list)  # run.json "runs" so far


class Trainer:
    def __init__(self, start: Start, *, layout: Layout, dist: D.Dist, device: str, precision: str,
                 cache: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpointer: Any,
                 log: RunLog, opts: Options) -> None:
        self.s, self.layout, self.dist, self.opts, self.log = start, layout, dist, opts, log
        self.cfg, self.t = start.cfg, start.cfg.train
        self.cache, self.raw_model, self.optimizer, self.ckpt = cache, model, optimizer, checkpointer
        self.device = dist.device(device)
        self.precision = precision
        self.global_batch = self.t.micro_batch * self.t.grad_accum * dist.world_size
        self.seq_len = cache.seq_len
        self.n_params = count_params(model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        if start.scaler:
            self.scaler.load_state_dict(asdict(start.scaler))
        self.model = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[dist.local_rank] if device == "cuda" else None)
        self.forward = torch.compile(self.model) if self.t.compile else self.model
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
        self.last_checkpoint: str | None = None
        self.known_loss: tuple[int, float] | None = None  # (step, loss): logged, or read for a save
        self.step_losses: list[torch.Tensor] = []  # the last step's micro-batch losses, still on the device

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
        )

    def check_growth(self) -> None:
        """Pick up chunks a concurrent `cache build` committed; rank 0 decides for every rank."""
        info = None
        if self.dist.is_main:
            self.cache.refresh()
            new = {str(c): n for c, n in self.cache.chunk_sizes.items() if c not in self.s.order.chunk_sizes}
            info = {"new": new, "generation": self.cache.generation, "n": self.cache.n_sequences}
        info = D.broadcast(self.dist, info)
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
        s = self.s
        return TrainerState(
            format=TRAINER_STATE_FORMAT, model_name=s.model_name, display_name=display_name(s.model_name, s.step, s.run),
            step=s.step, run=s.run, tokens_seen=s.tokens_seen, loss=loss, eval_loss=self.eval_at(s.step),
            best_eval_loss=s.best_eval_loss, saved_at=time.time(), elapsed_s=s.elapsed_s, epoch=s.epoch,
            cursor=s.cursor, growth_events=[e.to_dict() for e in s.order.events], data=s.order.state(),
            plan=PlanRecord(schedule=s.schedule, global_batch=self.global_batch, n_sequences=s.order.n_train_sequences),
            total_steps=s.schedule.total_steps,
            scaler=ScalerState(**self.scaler.state_dict()) if self.scaler.is_enabled() else None,
            rng=rng_state(), cache=self.cache_record(), config_hash=self.cfg.hash(), world_size=self.dist.world_size,
            global_batch=self.global_batch, precision=self.precision, versions=versions(),
        )

    def eval_at(self, step: int) -> float | None:
        return self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None

    def loss_now(self) -> float:
        """The loss at the current step: its logged value, else this step's own, read here (one sync
        and one all-reduce, so only at a save or the finish, never per step). Every rank calls it."""
        if self.known_loss is None or self.known_loss[0] != self.s.step:
            (total,) = D.all_reduce_sum(self.dist, [torch.stack(self.step_losses).sum().item()])
            self.known_loss = (self.s.step, total / self.dist.world_size)
        return self.known_loss[1]

    def save(self) -> None:
        if self.saved_at_step == self.s.step:
            return
        self.saved_at_step = self.s.step
        loss = self.loss_now()
        if not self.dist.is_main:
            return
        saved = self.ckpt.save(step=self.s.step, model=self.raw_model, optimizer=self.optimizer,
                               trainer_state=self.trainer_state(loss).to_dict(), tokenizer_dir=self.cache.tokenizer_dir,
                               eval_loss=self.eval_at(self.s.step))
        self.last_checkpoint = saved.display_name
        self.log.emit(P.CheckpointSaved(step=self.s.step, path=str(saved.path), display_name=saved.display_name,
                                        loss=loss, seconds=saved.seconds, bytes=saved.bytes))

    # --- eval ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        ids = self.s.order.eval_ids(self.t.eval_batches * self.t.micro_batch)
        if len(ids) == 0:
            return None
        mine = ids[self.dist.rank::self.dist.world_size]
        self.raw_model.eval()
        total, count = 0.0, 0
        for i in range(0, len(mine), self.t.micro_batch):
            rows = torch.from_numpy(read_sequences(self.cache, mine[i:i + self.t.micro_batch])).to(self.device)
            with autocast(self.device, self.precision):
                total += lm_loss(self.raw_model, rows).item() * len(rows)
            count += len(rows)
        self.raw_model.train()
        total, count = D.all_reduce_sum(self.dist, [total, float(count)])
        loss = total / count
        self.last_eval = (self.s.step, loss)
        if self.s.best_eval_loss is None or loss < self.s.best_eval_loss:
            self.s.best_eval_loss = loss
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
        return tuple(D.any_flags(self.dist, flags))  # type: ignore[return-value]

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
        s, t, dist = self.s, self.t, self.dist
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
                self.write_run_json(log_path)
                self.log.attach(log_path, self.header())
            if s.rng is not None:
                set_rng_state(s.rng)
            self.log.emit(P.State(state="running", reason="started"))
            return self.loop()
        except Exception as e:  # the log says how the run ended; the CLI reports the error itself
            self.log.emit(P.Error(message=str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
            self.log.emit(P.Finished(step=s.step, reason="error", checkpoint=self.last_checkpoint))
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.log.close()
            if dist.is_main:
                lock.release()

    def loop(self) -> int:
        s, t, dist = self.s, self.t, self.dist
        mb, accum = t.micro_batch, t.grad_accum
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        loss_sum = torch.zeros((), device=self.device)
        steps_since_log, excluded, paused = 0, 0.0, 0.0  # excluded: eval, saves, control, pauses
        t_log = time.perf_counter()
        while s.step < s.schedule.total_steps:
            lr = s.schedule.lr(s.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            ids, next_epoch, next_cursor = s.order.take(s.epoch, s.cursor, self.global_batch)
            mine = rank_slice(ids, dist.rank, dist.world_size)
            self.trace(mine)
            rows = torch.from_numpy(read_sequences(self.cache, mine)).to(self.device, non_blocking=True)
            self.step_losses.clear()
            for k in range(accum):
                sync = k == accum - 1 or not dist.enabled
                with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast(self.device, self.precision):
                    loss = lm_loss(self.forward, rows[k * mb:(k + 1) * mb]) / accum
                self.scaler.scale(loss).backward()
                loss_sum += loss.detach()
                self.step_losses.append(loss.detach())
            log_now = (s.step + 1) % t.log_interval == 0 or s.step + 1 == s.schedule.total_steps
            grad_norm = None
            if t.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            elif log_now:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            s.step += 1
            s.epoch, s.cursor = next_epoch, next_cursor
            s.tokens_seen += self.global_batch * self.seq_len
            steps_since_log += 1

            if log_now:
                (mean_loss,) = D.all_reduce_sum(dist, [loss_sum.item() / steps_since_log])
                self.known_loss = (s.step, mean_loss / dist.world_size)
                now = time.perf_counter()
                train_time = max(now - t_log - excluded, 1e-9)
                s.elapsed_s += now - t_log - paused
                self.log.emit(self.step_event(self.known_loss[1], lr, float(grad_norm) if grad_norm is not None else 0.0,
                                              steps_since_log, train_time))
                loss_sum.zero_()
                steps_since_log, excluded, paused, t_log = 0, 0.0, 0.0, time.perf_counter()
            t_boundary = time.perf_counter()
            done = s.step >= s.schedule.total_steps
            if s.order.eval_chunks and (s.step % t.eval_interval == 0 or done):
                self.evaluate()
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

    def step_event(self, loss: float, lr: float, grad_norm: float, steps: int, train_time: float) -> P.Step:
        s = self.s
        total = s.schedule.total_steps
        dev_mem = 0.0
        if self.device.type == "cuda":
            dev_mem = torch.cuda.max_memory_allocated(self.device) / 1e9
        elif self.device.type == "mps":
            dev_mem = torch.mps.current_allocated_memory() / 1e9
        return P.Step(
            step=s.step, total_steps=total, loss=loss, lr=lr, grad_norm=grad_norm,
            tokens_per_sec=steps * self.global_batch * self.seq_len / train_time,
            eta_s=(total - s.step) * train_time / steps, progress_pct=100.0 * s.step / total,
            rss_gb=psutil.Process().memory_info().rss / 1e9, device_mem_gb=dev_mem, epoch=s.epoch,
            tokens_seen=s.tokens_seen,
        )

    def finish(self, reason: str) -> int:
        self.save()
        self.log.emit(P.Finished(step=self.s.step, reason=reason, final_loss=self.loss_now(),  # type: ignore[arg-type]
                                 checkpoint=self.last_checkpoint))
        return 0

    # --- run records -----------------------------------------------------------------------------
    def header(self) -> P.RunStarted:
        from engine.hardware import snapshot

        s = self.s
        return P.RunStarted(
            model=s.model_name, run=s.run, start_step=s.step, total_steps=s.schedule.total_steps,
            target_tokens=s.schedule.total_steps * self.global_batch * self.seq_len, resumed_from=s.resumed_from,
            pid=psutil.Process().pid, world_size=self.dist.world_size, config=self.cfg.to_dict(),
            hardware={**snapshot(self.layout), "precision": self.precision, "n_params": self.n_params},
        )

    def write_run_json(self, log_path: Path) -> None:
        from engine.hardware import snapshot

        s = self.s
        entry = RunRecord(
            run=s.run, started=time.time(), start_step=s.step, resumed_from=s.resumed_from,
            log=str(log_path.relative_to(self.layout.root)), world_size=self.dist.world_size,
            precision=self.precision, hardware=snapshot(self.layout),
        )
        run_file = RunFile(config=self.cfg.to_dict(), runs=s.history + [entry])
        atomic_write_json(self.layout.run_json(s.model_name), run_file.to_dict())


def read_run_json(layout: Layout, model: str) -> RunFile:
    path = layout.run_json(model)
    if not path.exists():
        raise UserError(f"no run named {model!r} in {layout.checkpoints_root} (missing {path.name})")
    return RunFile.from_dict(read_file(path), path)


def next_run_number(history: list[RunRecord]) -> int:
    return max((r.run for r in history), default=0) + 1




# --- building a Trainer: a new run or a resumed one ------------------------------------------------


def open_cache(cfg: RunConfig, layout: Layout, dist: D.Dist, log: RunLog, *, workers: int | None = None,
               recorded: str | None = None) -> Any:
    """The run's cache: an explicit path, else the one its data config names; a missing cache is
    built first when the config names a source (rank 0 builds, the others wait)."""
    from engine.cache.build import build_cache, cache_path_for
    from engine.cache.metadata import METADATA_FILE
    from engine.cache.reader import PackedCache
    from engine.cache.tokenizer import parse_tokenizer_spec

    d = cfg.data
    path = Path(d.cache).expanduser() if d.cache else cache_path_for(d, layout)
    if recorded and not (path / METADATA_FILE).is_file() and Path(recorded).is_dir():
        path = Path(recorded)  # the root moved or was renamed: the checkpoint knows where it trained
    if not (path / METADATA_FILE).is_file():
        if d.cache or not d.source or recorded:
            raise UserError(f"no packed cache at {path}; build it with `packtrain-engine cache build`")
        if dist.is_main:
            log.info(f"Building cache {path} from {d.source} ...")
            build_cache(d, layout, workers=workers, on_event=log.emit)
        D.barrier(dist)
    cache = PackedCache(path, cache_bytes=cfg.train.shuffle_buffer_mb << 20)
    spec = str((cache.meta.get("tokenizer") or {}).get("spec", ""))
    if d.cache:  # an explicit cache decides what the data is; the saved config says so too
        d.seq_len, d.tokenizer = cache.seq_len, spec or d.tokenizer
    elif not recorded and spec and spec != parse_tokenizer_spec(d.tokenizer).spec:
        raise UserError(f"cache {path} was built with tokenizer {spec!r}, not {d.tokenizer!r}: pass "
                        f"--tokenizer {spec} to train on it, or another --dataset-name to build a new one")
    return cache


def token_ids(cache: Any) -> dict[str, int]:
    """bos/eos/pad ids of the cache's tokenizer, for the model config and so for generate()."""
    from engine.cache.tokenizer import special_token_ids

    return special_token_ids(cache.tokenizer_dir, cache.eos_id)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: str) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                             fused=device == "cuda" or None)


def prepare_model(config: Any, cfg: RunConfig, device: str, dist: D.Dist) -> torch.nn.Module:
    model = build_model(config, cfg.train.seed).to(dist.device(device))
    if cfg.train.grad_checkpointing:
        # transformers 5.24 deprecates the old name (a FutureWarning; gone in v6); older ones have only it
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def choose_name(cfg: RunConfig, layout: Layout, n_params: int, dataset: str, seq_len: int, prefix: str = "") -> str:
    """The given name unless it is taken (engine.names.taken_reason, the TUI's rule too); else the
    first free suggestion."""
    if cfg.name:
        return validate_new_name(cfg.name, layout)
    taken = taken_names(layout)
    base = prefix + suggest_names(n_params, dataset, seq_len)[0]
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def new_run(cfg: RunConfig, layout: Layout, opts: Options, *, workers: int | None = None,
            name_prefix: str = "") -> Trainer:
    """Everything a fresh run needs, checked before anything about the run is written."""
    from engine.checkpoint import Checkpointer

    cfg.validate()
    if cfg.name:
        validate_new_name(cfg.name, layout)  # now, not after a whole cache was built for it
    device = pick_device(cfg.train.device)
    dist = D.init(device)
    precision = D.broadcast(dist, pick_precision(cfg.train.precision, device, cfg, layout) if dist.is_main else None)
    log = RunLog(events=opts.events, enabled=dist.is_main)
    cache = open_cache(cfg, layout, dist, log, workers=workers)
    order = DataOrder.start(cfg.train.seed, cache.chunk_sizes, cfg.data.eval_chunks,
                            rows_in_budget(cache.cache_bytes, cache.seq_len, cache.dtype))
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dist.world_size
    if global_batch > order.n_train_sequences:
        raise UserError(
            f"a step needs {global_batch:,} sequences (micro_batch {cfg.train.micro_batch:,} x grad_accum "
            f"{cfg.train.grad_accum:,} x {dist.world_size} processes) but {cache.path} holds only "
            f"{order.n_train_sequences:,} training sequences; lower --micro-batch or --grad-accum, or grow the cache")
    model = prepare_model(llama_config(cfg.model, cache.vocab_size, cache.seq_len, token_ids(cache)), cfg, device, dist)
    cfg.name = D.broadcast(dist, choose_name(cfg, layout, count_params(model), cache.dataset_name, cache.seq_len,
                                                     name_prefix) if dist.is_main else None)
    schedule, warnings = plan_schedule(cfg.train, order.n_train_sequences, global_batch, cache.seq_len)
    for w in warnings:
        log.warn(w)
    history = read_run_json(layout, cfg.name).runs if layout.run_json(cfg.name).exists() else []
    start = Start(cfg=cfg, model_name=cfg.name, run=next_run_number(history), schedule=schedule, order=order,
                  cache_sequences=cache.n_sequences, history=history)
    checkpointer = Checkpointer(layout, cfg.name, keep_last=cfg.train.keep_last, log=log.info)
    return Trainer(start, layout=layout, dist=dist, device=device, precision=precision, cache=cache, model=model,
                   optimizer=make_optimizer(model, cfg, device), checkpointer=checkpointer, log=log, opts=opts)


# Settings a resume may change: how long and how often, and how the same math is executed.
RESUMABLE = {
    "train": {"max_steps", "max_tokens", "epochs", "epoch_fraction", "save_interval", "keep_last", "log_interval",
              "eval_interval", "eval_batches", "growth_check_interval", "precision", "device", "compile",
              "grad_checkpointing", "micro_batch", "grad_accum", "estimated_total_sequences"},
    "data": {"cache"},
}


def check_overrides(saved: RunConfig, wanted: RunConfig) -> None:
    before, after = saved.to_dict(), wanted.to_dict()
    if before["name"] != after["name"]:
        raise UserError("a resumed run keeps its name; copy the checkpoint folder to train it under another name")
    for section in ("model", "data", "train"):
        for key, value in after[section].items():
            if value != before[section][key] and key not in RESUMABLE.get(section, set()):
                raise UserError(f"cannot change {section}.{key} when resuming ({before[section][key]!r} -> {value!r}): "
                                "it would change what the run computes; start a new run instead")


def model_of(ref: str, layout: Layout) -> tuple[str, str]:
    """(model, checkpoint reference) for a model name or folder, a display name or a checkpoint folder."""
    m = DISPLAY_RE.match(ref)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "trainer_state.json").exists():
        path = path.resolve()
        if path.parent.parent != layout.checkpoints_root:
            raise UserError(f"{path} is not under {layout.checkpoints_root}; pass --root to its packtrain root")
        return path.parent.name, str(path)
    if path.is_dir() and (path / "run.json").exists():
        return path.resolve().name, path.resolve().name
    if m and not layout.run_json(ref).exists():
        return m.group("model"), ref
    return check_name(ref, "model name"), ref


def resume_run(ref: str, layout: Layout, opts: Options, override: Any = None) -> Trainer:
    """Rebuild the exact training state a checkpoint holds; refuse if its data changed underneath.
    Everything is checked before the Trainer exists, so a refused resume writes nothing."""
    from engine.checkpoint import Checkpointer

    name, ref = model_of(ref, layout)
    run_file = read_run_json(layout, name)
    saved_cfg = RunConfig.from_dict(run_file.config)
    saved_cfg.name = saved_cfg.name or name
    cfg = override(RunConfig.from_dict(saved_cfg.to_dict())) if override else saved_cfg
    check_overrides(saved_cfg, cfg)
    cfg.validate()
    device = pick_device(cfg.train.device)
    dist = D.init(device)
    precision = D.broadcast(dist, pick_precision(cfg.train.precision, device, cfg, layout) if dist.is_main else None)
    log = RunLog(events=opts.events, enabled=dist.is_main)
    checkpointer = Checkpointer(layout, name, keep_last=cfg.train.keep_last, log=log.info)
    path = Path(D.broadcast(dist, str(checkpointer.resolve(ref)) if dist.is_main else None))
    state = checkpointer.open(path)  # the files' hashes and the whole state's shape, before anything is built
    source = path / TRAINER_STATE
    check_rng_state(state.rng, source)
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dist.world_size
    if state.global_batch != global_batch:
        raise UserError(
            f"global batch changed: the run used {state.global_batch} sequences per step, now "
            f"{cfg.train.micro_batch} x {cfg.train.grad_accum} x {dist.world_size} = {global_batch}; "
            "keep micro_batch x grad_accum x processes the same"
        )
    cache = open_cache(cfg, layout, dist, log, recorded=state.cache.path)
    order = DataOrder.restore(state.data, state.growth_events, cache.chunk_sizes)
    if state.cursor >= order.n_train_sequences or any(e.epoch > state.epoch for e in order.events):
        raise UserError(f"{source}: field 'cursor' ({state.cursor:,} in epoch {state.epoch}) is not a position in "
                        f"this run's data ({order.n_train_sequences:,} training sequences per epoch)")
    check_resume_cache(asdict(state.cache), cache, cache.manifest_hash(order.known_chunks))
    from transformers import LlamaConfig

    try:
        config = finish_config(LlamaConfig.from_json_file(str(path / "config.json")), token_ids(cache))
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} has no usable config.json: {e}") from None
    model = prepare_model(config, cfg, device, dist)
    optimizer = make_optimizer(model, cfg, device)
    checkpointer.load(path, model, optimizer)
    start = Start(
        cfg=cfg, model_name=name, run=next_run_number(run_file.runs), schedule=state.plan.schedule, order=order,
        step=state.step, epoch=state.epoch, cursor=state.cursor, tokens_seen=state.tokens_seen,
        elapsed_s=state.elapsed_s, best_eval_loss=state.best_eval_loss, cache_sequences=state.cache.total_sequences,
        resumed_from=display_name(name, state.step, state.run), rng=state.rng, scaler=state.scaler, history=run_file.runs,
    )
    return Trainer(start, layout=layout, dist=dist, device=device, precision=precision, cache=cache, model=model,
                   optimizer=optimizer, checkpointer=checkpointer, log=log, opts=opts)


def run_to_end(make: Any) -> int:
    """Build a trainer with `make()` and run it; the process group is torn down either way."""
    trainer = None
    try:
        trainer = make()
        code = trainer.run()
        # Ranks leave together: a rank that tears the gloo group down while a worker thread still
        # drops its last collective deadlocks on the GIL (pytorch#56297); the wait lets it finish.
        D.barrier(trainer.dist)
        return code
    finally:
        if trainer is not None:
            D.shutdown(trainer.dist)
