"""What the training loop needs from a framework, and nothing else.

The loop (engine.train), run assembly (engine.assemble) and the checkpoint commit (engine.checkpoint)
are written against `Backend`; one implementation per framework lives beside this file and is
imported by name at run time (engine.backends.load), so the framework-free layer never imports torch
or mlx. Tensors cross the seam only as opaque framework values keyed by Hugging Face names; the
loop itself sees numpy rows in and Python floats out.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil

from engine import protocol as P
from engine.config import ModelConfig, RunConfig, TrainConfig
from engine.errors import UserError
from engine.paths import Layout
from engine.state import OptimizerState, RngState, ScalerState

Tensor = Any  # a framework array: torch.Tensor or mlx.core.array


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run (torchrun); one process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StepResult:
    """One optimizer step's mean loss and pre-clip gradient norm, still on the device: the loop
    turns them into floats only on log steps (Backend.to_host), so steps never wait for the host.
    `skipped`: the divergence guard found the loss or the norm non-finite and left the weights and
    the optimizer as they were (the one per-step host read a guarded step makes)."""

    loss: Tensor
    grad_norm: Tensor | None
    skipped: bool = False


class DeviceOutOfMemory(Exception):
    """The framework ran out of device memory during a step (CUDA, MPS or Metal), translated by the
    backend so the loop's OOM ladder (engine.oom) needs no framework. The step left no trace: its
    partial gradients are dropped and the optimizer did not move, so the same step can run again."""


@dataclass(frozen=True)
class Memory:
    rss_gb: float
    device_gb: float  # device memory in use (peak where the framework tracks it); 0 on CPU


class Backend(ABC):
    """A model, its AdamW optimizer and the device they run on.

    Optimizer state crosses the seam in one layout for every backend: tensors `<param>/exp_avg`,
    `<param>/exp_avg_sq` and `<param>/step` (torch AdamW's names) plus JSON param groups
    {"params": [names], "lr", "betas", "eps", "weight_decay"}, decay group first.
    """

    name: ClassVar[str]
    fine_tunes: ClassVar[bool] = False  # loads pretrained models and LoRA adapters (build_pretrained)
    shards: ClassVar[bool] = False  # shards the model across torchrun's ranks (train.parallel fsdp)
    device: str  # what it trains on, as `info` reports it (cpu, cuda, mps, gpu)
    precision: str  # fp32, bf16 or fp16
    dist: Dist

    @abstractmethod
    def __init__(self, cfg: RunConfig, layout: Layout | None = None) -> None:
        """Pick the device and precision for `cfg` (joining the process group under torchrun);
        `layout` is where an `auto` precision measurement is cached (default: the resolved root)."""

    # --- model and optimizer ------------------------------------------------------------------
    @abstractmethod
    def build(self, config: Mapping[str, Any], train: TrainConfig) -> None:
        """A fresh model from HF LlamaConfig fields (random init from train.seed) and its AdamW:
        decay on projection matrices only, as engine.backends.torch_model.param_groups explains."""

    def build_pretrained(self, folder: Path, model: ModelConfig, train: TrainConfig,
                         base: dict[str, Any] | None = None) -> None:
        """The pretrained model in `folder` (any causal LM), trained whole (model.method full) or
        through a fresh LoRA adapter; `base` is the base record an adapter checkpoint carries. Only
        backends with `fine_tunes` implement it (engine.assemble refuses the others first)."""
        raise NotImplementedError

    @property
    @abstractmethod
    def n_params(self) -> int: ...

    @property
    def n_trainable(self) -> int:
        """Parameters the optimizer updates: all of them, or an adapter's."""
        return self.n_params

    def extra_files(self) -> dict[str, str]:
        """Text files a checkpoint holds besides the model's own (an adapter's config and base record)."""
        return {}

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """config.json as transformers writes it, so the checkpoint folder is an HF model folder."""

    @abstractmethod
    def generation_config(self) -> str | None:
        """generation_config.json text, when the framework has one."""

    # --- steps --------------------------------------------------------------------------------
    trains_flags: ClassVar[bool] = False  # whether train_step/eval_loss honour `flags` (instruction caches)

    def enable_grad_checkpointing(self) -> bool:
        """Recompute activations in the backward pass from now on (the OOM ladder's second rung);
        False where the backend cannot."""
        return False

    @abstractmethod
    def weights_finite(self) -> bool:
        """No NaN or inf in any parameter: a checkpoint is never written otherwise."""

    @abstractmethod
    def train_step(self, rows: np.ndarray, lr: float, *, micro_batch: int, grad_accum: int, grad_clip: float,
                   want_norm: bool, flags: np.ndarray | None = None, guard: bool = False,
                   poison: bool = False) -> StepResult:
        """One optimizer step on packed rows [n, seq_len + 1] (x = row[:-1], y = row[1:]) at `lr`,
        in `grad_accum` micro-batches, clipped to `grad_clip` by global norm (0: no clipping; the
        norm is then computed only when `want_norm` or `guard`).

        `flags` (engine.token_flags, same shape as rows) marks the targets that train and where
        packed examples start; the loss is then the sum over trained targets of the whole global
        batch divided by their count, so micro-batches and ranks with more response tokens weigh
        exactly as much as those tokens do. None: every target trains, rows are one stream.

        `guard`: skip the update when the loss or the norm is not finite (StepResult.skipped; fp16
        leaves an overflowed norm to its loss scaler, which skips such steps itself). `poison`: the
        NaN fault hook (engine.faults), this step's loss is NaN. Out of memory raises
        DeviceOutOfMemory, after faults.oom(micro_batch) too."""

    @abstractmethod
    def eval_loss(self, rows: np.ndarray, flags: np.ndarray | None = None) -> float:
        """Mean next-token loss of `rows` (over the trained targets when `flags` are given) without
        touching gradients or optimizer state."""

    @abstractmethod
    def to_host(self, values: list[Tensor]) -> list[float]:
        """Device scalars as floats, with one synchronisation for the lot."""

    def sampler(self, tokenizer_dir: Path, eos_id: int, context: int) -> Callable[[str, P.SamplingParams], tuple[str, int]]:
        """A function that continues a prompt with the model being trained, for samples during
        training: (text, new tokens). It leaves the model in training mode; the caller restores
        the RNGs. A backend that cannot refuses here, before the run starts."""
        raise UserError(f"train.sample_every: the {self.name} backend cannot generate samples during training; "
                        "train with --backend torch, or leave --sample-every out")

    # --- named tensors ------------------------------------------------------------------------
    def full_state(self) -> AbstractContextManager[None]:
        """Every rank enters this around a save; rank 0 calls weights() and optimizer_state() inside.
        A sharded model gathers its whole state onto rank 0 here, a collective no rank may skip."""
        return nullcontext()

    @abstractmethod
    def weights(self) -> dict[str, Tensor]:
        """Parameters under HF names; tied weights once, under the embedding's name."""

    @abstractmethod
    def weight_shapes(self) -> dict[str, tuple[int, ...]]: ...

    @abstractmethod
    def load_weights(self, tensors: Mapping[str, Tensor]) -> None:
        """Names and shapes are already checked against weight_shapes()."""

    @abstractmethod
    def optimizer_groups(self) -> list[list[str]]:
        """Parameter names per param group, decay group first."""

    @abstractmethod
    def optimizer_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(`<param>/<key>` tensors, JSON {"param_groups": [...], "scalars": {param: {key: value}}})."""

    @abstractmethod
    def load_optimizer_state(self, tensors: Mapping[str, Mapping[str, Tensor]], saved: OptimizerState,
                             where: str) -> None:
        """Restore from tensors grouped by parameter name ({param: {key: tensor}}) and the saved
        groups; the caller has checked names and shapes. Refusals are one UserError line starting
        with `where`."""

    @abstractmethod
    def save_tensors(self, tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
        """One safetensors file; weights carry metadata {"format": "pt"}, which transformers expects."""

    @abstractmethod
    def load_tensors(self, path: Path) -> dict[str, Tensor]: ...

    # --- RNG, precision, memory, facts --------------------------------------------------------
    @abstractmethod
    def rng_state(self) -> RngState:
        """Every RNG a step could draw from, as JSON-safe lists."""

    @abstractmethod
    def set_rng_state(self, state: RngState) -> None:
        """Restore what rng_state() saved; another backend's generators are ignored (they cannot
        carry), the host RNGs (numpy, random) always restore."""

    def check_rng_state(self, state: RngState, source: Path) -> None:
        """Refuse, before anything is written, a saved state that set_rng_state would fail on."""
        check_host_rng_state(state, source)

    def scaler_state(self) -> ScalerState | None:
        """Loss-scaler state for fp16 (torch on CUDA); None elsewhere."""
        return None

    def load_scaler_state(self, state: ScalerState | None) -> None:
        return None

    @abstractmethod
    def precision_context(self) -> AbstractContextManager[None]:
        """The context forward passes run under (autocast), for callers outside train/eval."""

    @abstractmethod
    def memory(self) -> Memory: ...

    def reset_peak_memory(self) -> None:
        """Start a new peak for memory().device_gb (the planner measures each candidate's own)."""
        return None

    def memory_limit_gb(self) -> float:
        """What a run may use: the device's memory where there is one, else the RAM free now."""
        return psutil.virtual_memory().available / 1e9

    def release_memory(self) -> None:
        """Hand cached device memory back (after an OOM, between planner candidates)."""
        return None

    @classmethod
    @abstractmethod
    def facts(cls, layout: Layout) -> dict[str, Any]:
        """The hardware snapshot `info` prints and every run records (keys of torch_hardware.snapshot);
        needs no model, so `info` asks before any run."""

    @classmethod
    @abstractmethod
    def choose_precision(cls, requested: str, device: str, cfg: RunConfig, layout: Layout) -> tuple[str, str]:
        """(precision, why) for train.precision = `requested` on `device`: the backend's whole policy."""

    @abstractmethod
    def versions(self) -> dict[str, str]: ...

    # --- collectives (no-ops in one process) --------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's JSON-able value on every rank."""
        return obj

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def any_flags(self, flags: list[bool]) -> list[bool]:
        """Per-flag OR across ranks."""
        return flags

    def barrier(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def host_rng_state() -> dict[str, Any]:
    """numpy's and Python's global RNGs as RngState fields (every backend records these too)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "random": (py_state[0], list(py_state[1]), py_state[2]),
    }


def _host_states(state: RngState) -> tuple[tuple, tuple]:
    n, r = state.numpy, state.random
    return (n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]), (r[0], tuple(r[1]), r[2])


def set_host_rng_state(state: RngState) -> None:
    np_state, py_state = _host_states(state)
    np.random.set_state(np_state)
    random.setstate(py_state)


def check_host_rng_state(state: RngState, source: Path) -> None:
    """Try the saved numpy and Python states on throwaway generators: one they refuse is refused
    here, before the run starts, rather than when it is restored after the run started."""
    key, pos = state.numpy[1], state.numpy[2]
    if len(key) != 624 or not 0 <= pos <= 624:  # numpy accepts any position, then reads past the key
        raise UserError(f"{source}: field 'rng.numpy' is not an MT19937 state (624 words and a position 0-624)")
    try:
        np_state, py_state = _host_states(state)
        np.random.RandomState().set_state(np_state)
        random.Random().setstate(py_state)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise UserError(f"{source}: field 'rng' holds a state the generators refuse: "
                        f"{' '.join(str(e).split())[:120]}") from None
