"""The MLX backend: mlx-lm's own llama (mlx_lm.models.llama), mlx.optimizers.AdamW, Apple's GPU or the CPU.

One checkpoint layout serves both backends: mlx-lm's llama names its parameters as transformers
does (`model.layers.N.self_attn.q_proj.weight`; a tied model has no lm_head, as the HF file has
none), and the AdamW moments are saved under torch's keys. The two AdamWs are the same update
(decoupled weight decay, bias-corrected moments, eps outside the square root), so a checkpoint
continues on either backend with its optimizer state.

The master weights stay fp32 in `self.params`; every forward runs on a copy cast to the compute
dtype (bf16 when asked), so gradients and updates are fp32 like torch's autocast. Steps are queued
with mx.async_eval: the host reads the next rows while the device works, and waits only when the
loop asks for a loss on a log step.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import psutil
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.llama import Model, ModelArgs

from engine import host
from engine.backends.base import (
    Backend, DeviceOutOfMemory, Dist, Memory, StepResult, host_rng_state, set_host_rng_state,
)
from engine.config import RunConfig, TrainConfig
from engine.errors import UserError
from engine.faults import Faults
from engine.model_config import complete
from engine.paths import Layout
from engine.state import OptimizerState, RngState
from engine.units import GIB

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16}
EMBEDDING = "model.embed_tokens.weight"
ADAMW_KEYS = {"exp_avg": "m", "exp_avg_sq": "v"}  # torch's names for mlx's moments; "step" is shared
OOM_WORDS = ("out of memory", "insufficient memory", "resource limit", "[metal::malloc]")  # what Metal's failures say


def pick_device(choice: str) -> str:
    """`auto` is the GPU when mlx has one (Metal), else the CPU; mps or cuda ask for the GPU."""
    gpu = mx.is_available(mx.gpu)
    if choice == "auto":
        return "gpu" if gpu else "cpu"
    if choice in ("mps", "cuda"):
        if not gpu:
            raise UserError(f"train.device is {choice} but mlx has no GPU here; use --device cpu or --backend torch")
        return "gpu"
    return "cpu"


def pick_precision(choice: str) -> tuple[str, str]:
    """fp32 unless bf16 is asked for; fp16 needs a gradient scaler, which this backend does not have."""
    if choice == "fp16":
        raise UserError("precision fp16 trains with a gradient scaler, which the mlx backend lacks; use bf16 or fp32")
    if choice == "auto":
        return "fp32", "mlx trains in fp32 unless --precision bf16 asks for bf16 compute"
    return choice, "set in the config"


def model_args(fields: Mapping[str, Any]) -> ModelArgs:
    config = complete(fields)
    if config["hidden_act"] != "silu":
        raise UserError(f"invalid model config: the mlx llama uses silu, not {config['hidden_act']!r}")
    if config["rope_parameters"]["rope_type"] != "default" or config.get("rope_scaling"):
        raise UserError("invalid model config: the mlx backend trains default RoPE only (no rope scaling)")
    return ModelArgs.from_dict(config)


def init_params(model: Model, std: float, seed: int) -> dict[str, Any]:
    """transformers' LlamaForCausalLM init (normal(0, initializer_range) matrices, zero biases,
    unit norm gains) from mlx's RNG seeded with `seed`."""
    mx.random.seed(seed % (1 << 64))  # mlx takes an unsigned seed; the config allows torch's range
    fresh = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            fresh.append((name, mx.ones_like(p)))
        elif name.endswith(".bias"):
            fresh.append((name, mx.zeros_like(p)))
        else:
            fresh.append((name, mx.random.normal(p.shape) * std))
    return tree_unflatten(fresh)


def is_out_of_memory(e: RuntimeError) -> bool:
    """mlx raises a plain RuntimeError when Metal cannot allocate; its message is all there is to go by."""
    text = str(e).lower()
    return any(word in text for word in OOM_WORDS)


def decays(name: str, p: mx.array) -> bool:
    """The torch backend's rule (torch_model.param_groups): matrices decay, the embedding does not."""
    return p.ndim >= 2 and name != EMBEDDING


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, cfg: RunConfig, layout: Layout | None = None) -> None:
        train = cfg.train
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("the mlx backend trains in one process; use --backend torch under torchrun")
        for flag in ("compile", "grad_checkpointing"):
            if getattr(train, flag):
                raise UserError(f"train.{flag} is a torch option; pass --no-{flag.replace('_', '-')} with --backend mlx")
        self.device = pick_device(train.device)
        self.precision, _ = pick_precision(train.precision)
        self.dist = Dist()
        mx.set_default_device(mx.gpu if self.device == "gpu" else mx.cpu)
        self.dtype = DTYPES[self.precision]
        self.faults = Faults.from_env()

    def build(self, config: Mapping[str, Any], train: TrainConfig) -> None:
        self.config = complete(config)
        self.model = Model(model_args(config))
        self.params = init_params(self.model, float(self.config["initializer_range"]), train.seed)
        flat = tree_flatten(self.params)
        self.groups = [[n for n, p in flat if decays(n, p)], [n for n, p in flat if not decays(n, p)]]
        self.decay = train.weight_decay
        self.optimizers = [
            optim.AdamW(learning_rate=train.lr, betas=[train.beta1, train.beta2], eps=1e-8, weight_decay=decay,
                        bias_correction=True)
            for decay in (train.weight_decay, 0.0)
        ]
        self.value_and_grad = mx.value_and_grad(self._loss)
        mx.eval(self.params)

    def _loss(self, params: dict[str, Any], rows: mx.array, scale: float = 1.0) -> mx.array:
        """Mean next-token cross-entropy of rows [batch, seq_len + 1], times `scale`."""
        if self.dtype != mx.float32:
            params = tree_map(lambda p: p.astype(self.dtype), params)
        self.model.update(params)
        logits = self.model(rows[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, rows[:, 1:], reduction="mean") * scale

    @property
    def n_params(self) -> int:
        return sum(p.size for _, p in tree_flatten(self.params))

    def model_config(self) -> dict[str, Any]:
        return dict(self.config)

    def generation_config(self) -> str | None:
        return None

    # --- steps --------------------------------------------------------------------------------
    def train_step(self, rows: np.ndarray, lr: float, *, micro_batch: int, grad_accum: int, grad_clip: float,
                   want_norm: bool, flags: np.ndarray | None = None, guard: bool = False,
                   poison: bool = False) -> StepResult:
        try:  # `flags` never arrive: instruction caches are refused before a run starts (trains_flags)
            return self._step(rows, lr, micro_batch=micro_batch, grad_accum=grad_accum, grad_clip=grad_clip,
                              want_norm=want_norm, guard=guard, poison=poison)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            self.release_memory()  # the step's arrays are garbage already: params and optimizer were not touched
            raise DeviceOutOfMemory(" ".join(str(e).split())[:200]) from None

    def _step(self, rows: np.ndarray, lr: float, *, micro_batch: int, grad_accum: int, grad_clip: float,
              want_norm: bool, guard: bool, poison: bool) -> StepResult:
        batch = mx.array(rows.astype(np.int32))
        scale = float("nan") if poison else 1.0 / grad_accum
        loss_sum, grads = None, None
        for k in range(grad_accum):
            if self.faults.oom(micro_batch):
                raise RuntimeError(f"[metal::malloc] fault hook: a micro-batch of {micro_batch} rows "
                                   f"(above {self.faults.oom_above}) ran out of memory")
            loss, g = self.value_and_grad(self.params, batch[k * micro_batch:(k + 1) * micro_batch], scale)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            grads = g if grads is None else tree_map(mx.add, grads, g)
        norm = None
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        elif want_norm or guard:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
        if guard and not (mx.isfinite(loss_sum) & mx.isfinite(norm)).item():
            return StepResult(loss=loss_sum, grad_norm=norm, skipped=True)
        flat_grads = dict(tree_flatten(grads))
        updated: list[tuple[str, mx.array]] = []
        for opt, names in zip(self.optimizers, self.groups):
            opt.learning_rate = lr
            part = tree_unflatten([(n, flat_grads[n]) for n in names])
            updated += tree_flatten(opt.apply_gradients(part, self.params))
        self.params = tree_unflatten(updated)
        mx.async_eval(self.params, [o.state for o in self.optimizers], loss_sum, *([norm] if norm is not None else []))
        return StepResult(loss=loss_sum, grad_norm=norm)

    def weights_finite(self) -> bool:
        return all(mx.all(mx.isfinite(p)).item() for _, p in tree_flatten(self.params))

    def eval_loss(self, rows: np.ndarray, flags: np.ndarray | None = None) -> float:
        return self._loss(self.params, mx.array(rows.astype(np.int32))).item()

    def to_host(self, values: list[Any]) -> list[float]:
        mx.eval(values)
        return [v.item() for v in values]

    # --- named tensors ------------------------------------------------------------------------
    def weights(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.params))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in tree_flatten(self.params)}

    def load_weights(self, tensors: Mapping[str, mx.array]) -> None:
        self.params = tree_unflatten([(n, t.astype(mx.float32)) for n, t in tensors.items()])
        mx.eval(self.params)

    def optimizer_groups(self) -> list[list[str]]:
        return [list(names) for names in self.groups]

    def optimizer_state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors: dict[str, mx.array] = {}
        groups = []
        for opt, names, decay in zip(self.optimizers, self.groups, (self.decay, 0.0)):
            moments = dict(tree_flatten(opt.state))
            if names and f"{names[0]}.m" in moments:  # the group has taken a step
                step = mx.array(opt.state["step"].item(), dtype=mx.float32)
                for name in names:
                    tensors[f"{name}/step"] = step
                    for key, ours in ADAMW_KEYS.items():
                        tensors[f"{name}/{key}"] = moments[f"{name}.{ours}"]
            groups.append({"params": list(names), "lr": opt.learning_rate.item(), "betas": list(opt.betas),
                           "eps": opt.eps, "weight_decay": decay})
        return tensors, {"param_groups": groups, "scalars": {}}

    def load_optimizer_state(self, tensors: Mapping[str, Mapping[str, mx.array]], saved: OptimizerState,
                             where: str) -> None:
        if saved.scalars:
            raise UserError(f"{where} holds non-tensor state mlx's AdamW does not have; resume with "
                            "--reset-optimizer to continue the weights with fresh optimizer state")
        for opt, names in zip(self.optimizers, self.groups):
            held = [n for n in names if tensors.get(n)]
            if not held:
                continue  # saved before this group's first step
            if len(held) != len(names) or any(set(tensors[n]) != {"step", *ADAMW_KEYS} for n in names):
                raise UserError(f"{where} does not hold AdamW moments for every parameter; resume with "
                                "--reset-optimizer to continue the weights with fresh optimizer state")
            steps = {int(tensors[n]["step"].item()) for n in names}
            if len(steps) != 1:
                raise UserError(f"{where} has parameters at different step counts; resume with --reset-optimizer")
            state = tree_unflatten([(n, {ours: tensors[n][key].astype(mx.float32) for key, ours in ADAMW_KEYS.items()})
                                    for n in names])
            state["step"] = mx.array(steps.pop(), dtype=mx.uint64)
            state["learning_rate"] = opt.learning_rate
            opt.state = state
            mx.eval(opt.state)

    def save_tensors(self, tensors: Mapping[str, mx.array], path: Path, metadata: dict[str, str] | None = None) -> None:
        mx.save_safetensors(str(path), dict(tensors), metadata=metadata)

    def load_tensors(self, path: Path) -> dict[str, mx.array]:
        return mx.load(str(path))

    # --- RNG, precision, memory, facts --------------------------------------------------------
    def rng_state(self) -> RngState:
        """mlx's global key is recorded but has no setter: training draws nothing from it (no
        dropout; the data order has its own seeded generators) and a resume re-seeds it by
        building the model from the same seed, so it already holds the recorded value."""
        return RngState(mlx=np.array(mx.random.state[0]).tolist(), **host_rng_state())

    def set_rng_state(self, state: RngState) -> None:
        set_host_rng_state(state)

    def precision_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the cast happens on the parameters (_loss), not in a context

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def memory_limit_gb(self) -> float:
        if self.device == "gpu":
            info = mx.device_info()
            return float(info.get("max_recommended_working_set_size") or info["memory_size"]) / 1e9
        return super().memory_limit_gb()

    def release_memory(self) -> None:
        mx.clear_cache()

    def memory(self) -> Memory:
        device = mx.get_peak_memory() / 1e9 if self.device == "gpu" else 0.0
        return Memory(rss_gb=psutil.Process().memory_info().rss / 1e9, device_gb=device)

    @classmethod
    def facts(cls, layout: Layout) -> dict[str, Any]:
        facts = host.host_snapshot(layout)
        gpu = mx.is_available(mx.gpu)
        info = mx.device_info() if gpu else {}
        vram = info.get("memory_size")
        return {
            "device": "gpu" if gpu else "cpu",
            "device_name": f"Apple {platform.machine()} ({info.get('device_name', 'Metal')})" if gpu else host.cpu_name(),
            "device_count": 1,
            "bf16": True,
            **{k: facts[k] for k in ("ram_total_gb", "ram_available_gb")},
            "vram_gb": None if vram is None else round(vram / GIB, 2),
            "cpu_count": facts["cpu_count"],
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
            **{k: facts[k] for k in ("python", "root", "disk_free_gb")},
        }

    @classmethod
    def choose_precision(cls, requested: str, device: str, cfg: RunConfig, layout: Layout) -> tuple[str, str]:
        return pick_precision(requested)

    def versions(self) -> dict[str, str]:
        return {"mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "numpy": np.__version__,
                "python": platform.python_version()}


BACKEND = MLXBackend
