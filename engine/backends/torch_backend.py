"""The torch backend: a Llama with transformers' tensors (engine.backends.torch_model), fused AdamW,
autocast, DDP or FSDP2 (engine.backends.torch_fsdp) under torchrun.

Per step the host hands over numpy rows and gets back device scalars: loss and grad norm stay on
the device until the loop asks for them on a log step (to_host), so a step never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import torch
from safetensors.torch import load_file, save_file

from engine.backends import torch_distributed as D
from engine.backends.base import (
    Backend, DeviceOutOfMemory, Memory, StepResult, check_host_rng_state, host_rng_state, set_host_rng_state,
)
from engine.backends.torch_hardware import snapshot
from engine.backends import torch_precision
from engine.backends.torch_finetune import (
    adapter_config, base_model, enable_checkpointing, load_finetune_model,
    n_trainable, trainable_tensors,
)
from engine.backends.torch_optim import AdamW, fused_supported
from engine.backends.torch_model import (
    autocast, build_model, config_json, count_params, generating_view, generation_json, lm_loss, masked_nll,
    param_groups,
)
from engine.backends.torch_state import (
    flatten_optimizer, hf_state_dict, load_optimizer, named_optimizer_state, param_names, restored_optimizer_state, unwrap,
    weight_shapes,
)
from engine.config import ModelConfig, RunConfig, TrainConfig
from engine.errors import UserError
from engine.faults import Faults
from engine.paths import Layout
from engine.pretrained import BASE_FILE
from engine.state import OptimizerState, RngState, ScalerState
from engine.token_flags import loss_mask, position_ids, trained_tokens

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
    """The policy is torch_precision's; `auto` on a CPU measures the run's own layer shape there."""
    return torch_precision.choose(choice, device, cfg, layout).precision


def rng_state() -> RngState:
    """Every RNG the run could draw from, as JSON (a torch state tensor becomes a list of ints)."""
    return RngState(torch=torch.get_rng_state().tolist(),
                    cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
                    **host_rng_state())


def set_rng_state(state: RngState) -> None:
    if state.torch:  # empty when another backend saved it: its generators cannot carry
        torch.set_rng_state(torch.tensor(state.torch, dtype=torch.uint8))
    if state.cuda and torch.cuda.is_available():  # one state per device the saving process saw; this one may see fewer
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state.cuda][:torch.cuda.device_count()])
    set_host_rng_state(state)


def check_rng_state(state: RngState, source: Path) -> None:
    """Try the saved states on throwaway generators: one that torch, numpy or Python refuses is
    refused here, before the run starts, rather than when it is restored after the run started."""
    check_host_rng_state(state, source)
    try:
        if state.torch:
            torch.Generator().set_state(torch.tensor(state.torch, dtype=torch.uint8))
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise UserError(f"{source}: field 'rng' holds a state the generators refuse: "
                        f"{' '.join(str(e).split())[:120]}") from None
    if state.cuda and torch.cuda.is_available():
        devices = range(min(len(state.cuda), torch.cuda.device_count()))
        if any(len(state.cuda[i]) != torch.cuda.get_rng_state(i).numel() for i in devices):
            raise UserError(f"{source}: field 'rng.cuda' does not hold CUDA generator states")


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": version("transformers"), "numpy": np.__version__,
            "python": platform.python_version()}


# --- model and optimizer --------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW on the fused kernel (engine.backends.torch_optim); torch's own on a device without one."""
    make = AdamW if fused_supported(device) else torch.optim.AdamW
    return make(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def prepare_model(fields: Mapping[str, Any], t: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = build_model(fields, t.seed).to(device)
    if t.grad_checkpointing:
        enable_checkpointing(model)
    return model


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS a plain RuntimeError that says so."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class TorchBackend(Backend):
    name = "torch"
    trains_flags = True
    fine_tunes = True
    shards = True

    def __init__(self, cfg: RunConfig, layout: Layout | None = None) -> None:
        self.device = pick_device(cfg.train.device)
        self.dist = D.init(self.device)
        layout = layout or Layout.resolve()
        self.precision = D.broadcast(self.dist, pick_precision(cfg.train.precision, self.device, cfg, layout)
                                     if self.dist.is_main else None)
        self.torch_device = D.device(self.dist, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.adapter_files: dict[str, str] = {}  # written beside an adapter run's weights
        self.faults = Faults.from_env()
        # train.parallel fsdp: engine.backends.torch_fsdp, imported only then (torch.distributed.checkpoint is slow to import)
        self.fsdp: ModuleType | None = None
        if cfg.train.parallel == "fsdp" and self.dist.enabled:
            if self.precision == "fp16":
                raise UserError("train.parallel fsdp trains in bf16 or fp32 (fp16's loss scaling is not wired to "
                                "sharded gradients): pass --precision bf16 or fp32")
            self.fsdp = importlib.import_module("engine.backends.torch_fsdp")
        self.shapes: dict[str, tuple[int, ...]] = {}  # a sharded model's, taken before sharding
        self.gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # inside full_state()

    def build(self, config: Mapping[str, Any], train: TrainConfig) -> None:
        model = self.shard(prepare_model(config, train, self.torch_device))
        self.adopt(model, make_optimizer(model, train, self.device), compile=train.compile)

    def build_pretrained(self, folder: Path, model: ModelConfig, train: TrainConfig,
                         base: dict[str, Any] | None = None) -> None:
        net = self.shard(load_finetune_model(folder, model, train, self.precision, self.torch_device))
        if model.adapter:
            assert base is not None, "an adapter run records its base"
            record = {**base, "adapter_config": adapter_config(net, model.init_from or str(folder))}
            self.adapter_files = {BASE_FILE: json.dumps(record, indent=2, sort_keys=True) + "\n"}
        self.adopt(net, make_optimizer(net, train, self.device), compile=train.compile)

    def shard(self, net: torch.nn.Module) -> torch.nn.Module:
        """Under train.parallel fsdp, `net` sharded in place (before its optimizer is made, which
        must hold the sharded parameters); otherwise `net` as it is."""
        if self.fsdp is not None:
            self.shapes = weight_shapes(net)
            self.fsdp.shard(net, self.torch_device, self.precision)
        return net

    def adopt(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, compile: bool = False) -> None:
        """Train `model` with `optimizer` (DDP-wrapped under torchrun unless sharded, compiled on
        request); without an optimizer the backend only saves and loads weights."""
        self.net, self.optimizer, self.model = unwrap(model), optimizer, model
        if self.dist.enabled and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.dist.local_rank] if self.device == "cuda" else None)
        self.forward = torch.compile(self.model) if compile else self.model
        self.params = [p for p in self.net.parameters() if p.requires_grad]

    @property
    def n_params(self) -> int:
        return count_params(self.net)

    @property
    def n_trainable(self) -> int:
        return n_trainable(self.net)

    def extra_files(self) -> dict[str, str]:
        return self.adapter_files

    def model_config(self) -> dict[str, Any]:
        return config_json(base_model(self.net))

    def generation_config(self) -> str | None:
        return generation_json(base_model(self.net))

    # --- steps --------------------------------------------------------------------------------
    def _flag_tensors(self, flags: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(position ids, loss mask, trained targets) of flagged rows, on the device."""
        positions = torch.from_numpy(position_ids(flags)).to(self.torch_device, non_blocking=True)
        mask = torch.from_numpy(loss_mask(flags)).to(self.torch_device, non_blocking=True)
        return positions, mask, trained_tokens(flags)

    def train_step(self, rows: np.ndarray, lr: float, *, micro_batch: int, grad_accum: int, grad_clip: float,
                   want_norm: bool, flags: np.ndarray | None = None, guard: bool = False,
                   poison: bool = False) -> StepResult:
        try:
            return self._step(rows, lr, micro_batch=micro_batch, grad_accum=grad_accum, grad_clip=grad_clip,
                              want_norm=want_norm, flags=flags, guard=guard, poison=poison)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.release_memory()
            raise DeviceOutOfMemory(" ".join(str(e).split())[:200]) from None

    def _step(self, rows: np.ndarray, lr: float, *, micro_batch: int, grad_accum: int, grad_clip: float,
              want_norm: bool, flags: np.ndarray | None, guard: bool, poison: bool) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = torch.from_numpy(rows).to(self.torch_device, non_blocking=True)
        if flags is not None:
            positions, mask, trained = self._flag_tensors(flags)
            # DDP averages gradients over ranks, so each rank's sum is scaled by world / global count
            scale = self.dist.world_size / max(1.0, self.all_reduce_sum([float(trained)])[0])
        loss_sum = None
        for k in range(grad_accum):
            if self.faults.oom(micro_batch):
                raise torch.OutOfMemoryError(f"fault hook: a micro-batch of {micro_batch} rows "
                                             f"(above {self.faults.oom_above}) ran out of memory")
            sync = k == grad_accum - 1 or not self.dist.enabled
            part = slice(k * micro_batch, (k + 1) * micro_batch)
            if self.fsdp is not None:
                self.fsdp.set_gradient_sync(self.model, sync)
            with (contextlib.nullcontext() if sync or self.fsdp else self.model.no_sync()), \
                    autocast(self.torch_device, self.precision):
                if flags is None:
                    loss = lm_loss(self.forward, batch[part]) / grad_accum
                else:
                    loss = masked_nll(self.forward, batch[part], positions[part], mask[part]) * scale
                if poison:
                    loss = loss * float("nan")
            self.scaler.scale(loss).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        grad_norm = None
        if grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        elif want_norm or guard:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if grad_norm is not None and self.fsdp is not None:
            grad_norm = self.fsdp.local(grad_norm)
        skipped = guard and not self.finite(loss_sum, grad_norm)
        if skipped:
            self.scaler.update()  # the scaler saw the same inf/NaN gradients and backs off its scale
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss_sum, grad_norm=grad_norm, skipped=skipped)

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The guard's one host read per step. Under fp16 an overflowed norm is the loss scaler's to
        skip (it does, and lowers its scale); only the loss counts."""
        ok = torch.isfinite(loss)
        if not self.scaler.is_enabled():
            ok = ok & torch.isfinite(grad_norm)
        return bool(ok.item())

    def enable_grad_checkpointing(self) -> bool:
        enable_checkpointing(self.net)
        return True

    def weights_finite(self) -> bool:
        with torch.no_grad():  # a sharded model's gathered weights: a check of the shards would be a collective
            tensors = self.gathered[0].values() if self.gathered is not None else self.net.parameters()
            return all(bool(torch.isfinite(p).all()) for p in tensors)

    def release_memory(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.torch_device.type == "mps":
            torch.mps.empty_cache()

    def sampler(self, tokenizer_dir: Path, eos_id: int, context: int) -> Any:
        from engine.generate import training_sampler

        return training_sampler(generating_view(self.net), tokenizer_dir, eos_id, device=self.torch_device, precision=self.precision,
                                context=context)

    @torch.no_grad()
    def eval_loss(self, rows: np.ndarray, flags: np.ndarray | None = None) -> float:
        self.net.eval()
        batch = torch.from_numpy(rows).to(self.torch_device)
        try:
            with autocast(self.torch_device, self.precision):
                if flags is None:
                    return lm_loss(self.net, batch).item()
                positions, mask, trained = self._flag_tensors(flags)
                return masked_nll(self.net, batch, positions, mask).item() / max(1, trained)
        finally:
            self.net.train()
            if self.fsdp is not None:
                self.fsdp.reshard(self.net)

    def to_host(self, values: list[Any]) -> list[float]:
        return torch.stack([v.detach().float() for v in values]).tolist() if values else []

    # --- named tensors ------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_state(self) -> Any:
        if self.fsdp is None:
            yield
            return
        named = self.fsdp.gather_optimizer(self.net, self.optimizer) if self.optimizer is not None else None
        self.gathered = (self.fsdp.gather_weights(self.net, self.shapes), flatten_optimizer(named) if named else ({}, {}))
        try:
            yield
        finally:
            self.gathered = None

    def weights(self) -> dict[str, torch.Tensor]:
        if self.gathered is not None:
            return self.gathered[0]
        if self.adapter_files:  # the adapter alone: the base is the pretrained folder's
            return {n: p.detach().cpu().contiguous() for n, p in trainable_tensors(self.net).items()}
        return hf_state_dict(self.net)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.shapes:
            return self.shapes
        if self.adapter_files:
            return {n: tuple(p.shape) for n, p in trainable_tensors(self.net).items()}
        return weight_shapes(self.net)

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.fsdp is not None:
            self.fsdp.load_weights(self.net, tensors)
            return
        self.net.load_state_dict(dict(tensors), strict=False)  # tied copies share storage with what was loaded

    def optimizer_groups(self) -> list[list[str]]:
        return param_names(self.net, self.optimizer)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.gathered is not None:
            return self.gathered[1]
        return flatten_optimizer(named_optimizer_state(self.net, self.optimizer))

    def load_optimizer_state(self, tensors: Mapping[str, Mapping[str, torch.Tensor]], saved: OptimizerState,
                             where: str) -> None:
        if self.fsdp is not None:
            self.fsdp.load_optimizer(self.net, self.optimizer,
                                     restored_optimizer_state(tensors, saved, self.net, self.optimizer, where))
            return
        load_optimizer(tensors, saved, self.net, self.optimizer, where)

    def save_tensors(self, tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
        save_file(dict(tensors), str(path), metadata=metadata)

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))

    # --- RNG, precision, memory, facts --------------------------------------------------------
    def rng_state(self) -> RngState:
        return rng_state()

    def set_rng_state(self, state: RngState) -> None:
        set_rng_state(state)

    def check_rng_state(self, state: RngState, source: Path) -> None:
        check_rng_state(state, source)

    def scaler_state(self) -> ScalerState | None:
        return ScalerState(**self.scaler.state_dict()) if self.scaler.is_enabled() else None

    def load_scaler_state(self, state: ScalerState | None) -> None:
        if state:
            self.scaler.load_state_dict(asdict(state))

    def precision_context(self) -> contextlib.AbstractContextManager:
        return autocast(self.torch_device, self.precision)

    def reset_peak_memory(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def memory_limit_gb(self) -> float:
        if self.torch_device.type == "cuda":
            return torch.cuda.get_device_properties(self.torch_device).total_memory / 1e9
        if self.torch_device.type == "mps":
            return torch.mps.recommended_max_memory() / 1e9
        return super().memory_limit_gb()

    def memory(self) -> Memory:
        dev_mem = 0.0
        if self.torch_device.type == "cuda":
            dev_mem = torch.cuda.max_memory_allocated(self.torch_device) / 1e9
        elif self.torch_device.type == "mps":
            dev_mem = torch.mps.current_allocated_memory() / 1e9
        return Memory(rss_gb=psutil.Process().memory_info().rss / 1e9, device_gb=dev_mem)

    @classmethod
    def facts(cls, layout: Layout) -> dict[str, Any]:
        return snapshot(layout)

    @classmethod
    def choose_precision(cls, requested: str, device: str, cfg: RunConfig, layout: Layout) -> tuple[str, str]:
        choice = torch_precision.choose(requested, device, cfg, layout)
        return choice.precision, choice.reason

    def versions(self) -> dict[str, str]:
        return versions()

    # --- collectives --------------------------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        return D.broadcast(self.dist, obj)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return D.all_reduce_sum(self.dist, values)

    def any_flags(self, flags: list[bool]) -> list[bool]:
        return D.any_flags(self.dist, flags)

    def barrier(self) -> None:
        D.barrier(self.dist)

    def shutdown(self) -> None:
        D.shutdown(self.dist)


BACKEND = TorchBackend
