"""AdamW on torch's fused kernel, without torch._dynamo.

torch.optim's AdamW is the update we want, but constructing any torch.optim optimizer imports
torch._dynamo (its add_param_group, zero_grad, state_dict and load_state_dict are wrapped in
`torch._disable_dynamo`, which imports it on first call, and every step imports it again). That
import is about 1.8 s of CPU, more than half of what a resume spends before its first step. This
class is a torch.optim.Optimizer (GradScaler, torch.distributed.checkpoint's optimizer state dicts
and LR changes through `param_groups` work as with any other) whose step calls the same fused
kernel `torch.optim.AdamW(fused=True)` calls, one call per device and dtype, on CPU as on CUDA: on
CPU that kernel is ~3.5x faster than the default per-tensor loop.

Its state is torch AdamW's (`step`, `exp_avg`, `exp_avg_sq` per parameter) and a group's numbers
are the same (lr, betas, eps, weight_decay), so a checkpoint written with either loads into the
other. The base class's dynamo-wrapped methods are used unwrapped (`__wrapped__`, set by
functools.wraps): nothing compiles the optimizer, so the wrapper has nothing to disable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def _unwrapped(method: Callable) -> Callable:
    return getattr(method, "__wrapped__", method)


def fused_supported(device: torch.device | str) -> bool:
    return torch.device(device).type in _get_fused_kernels_supported_devices()


class AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter), as torch.optim.AdamW with fused=True.

    Like it, the step takes GradScaler's scale and inf flag (`grad_scale`, `found_inf`, set by
    GradScaler.step) into the kernel, which skips the update on inf, so fp16 on CUDA never waits
    for the flag on the host."""

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    add_param_group = _unwrapped(torch.optim.Optimizer.add_param_group)
    zero_grad = _unwrapped(torch.optim.Optimizer.zero_grad)
    state_dict = _unwrapped(torch.optim.Optimizer.state_dict)
    load_state_dict = _unwrapped(torch.optim.Optimizer.load_state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for (device, _), (params, grads, exp_avgs, exp_avg_sqs, steps) in self._batches(group).items():
                scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                    eps=group["eps"], maximize=False, grad_scale=scale, found_inf=inf)
                if inf is not None:  # a skipped update does not count as a step
                    torch._foreach_sub_(steps, [inf] * len(steps))
        return loss

    def _batches(self, group: dict[str, Any]) -> dict[tuple[torch.device, torch.dtype], tuple[list, ...]]:
        """The group's parameters with gradients, by device and dtype (one kernel call each), their
        state created on first use; a step counter restored on the CPU (or as a number) moves to its
        parameter's device, where the kernel reads it."""
        batches: dict[tuple[torch.device, torch.dtype], tuple[list, ...]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not (torch.is_tensor(state["step"]) and state["step"].device == p.device):
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)
            lists = batches.setdefault((p.device, p.dtype), ([], [], [], [], []))
            for into, value in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                into.append(value)
        return batches
