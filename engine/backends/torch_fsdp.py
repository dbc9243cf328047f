"""FSDP2 under torchrun (`train.parallel: fsdp`): each rank keeps a shard of every weight, gradient
and AdamW moment instead of DDP's whole copy, so the training state of a model N times too big for
one device fits on N.

Each decoder layer is its own unit (gathered for its forward and backward, then freed), the root
holds the rest (embeddings, tied head, final norm). Checkpoints keep the one format every run
writes: a save gathers the full weights and the optimizer state by parameter name onto rank 0's
CPU (a collective), and a load hands every rank the full tensors to keep its shard of, so a
checkpoint moves freely between FSDP, DDP and one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
SCATTER = StateDictOptions(full_state_dict=True, strict=False)  # whole tensors on every rank; tied copies absent


def policy(device: torch.device, precision: str) -> MixedPrecisionPolicy:
    """bf16 compute on CUDA when the run computes in bf16 (fp32 master shards and gradient
    reduction); fp32 elsewhere, where autocast alone decides."""
    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(net: torch.nn.Module, device: torch.device, precision: str) -> None:
    """fully_shard each decoder layer (the classes transformers keeps whole: _no_split_modules),
    then the root. Every rank built the same model from the same seed, so the shards fit together."""
    layers = set(getattr(net, "_no_split_modules", None) or ())
    mp = policy(device, precision)
    for module in list(net.modules()):
        if module is not net and type(module).__name__ in layers:
            fully_shard(module, mp_policy=mp)
    fully_shard(net, mp_policy=mp)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients on the last micro-batch only, as DDP's no_sync does."""
    assert isinstance(model, FSDPModule), "set_gradient_sync takes the sharded root"
    model.set_requires_gradient_sync(sync)


def reshard(model: torch.nn.Module) -> None:
    """Free the root's gathered parameters after a forward with no backward (an eval): FSDP keeps
    them for the backward that would follow, and until resharded the model's parameters are not
    the optimizer's."""
    assert isinstance(model, FSDPModule), "reshard takes the sharded root"
    model.reshard()


def local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (clip_grad_norm_'s total norm over sharded grads) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_weights(net: torch.nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The whole weights under `names` (tied copies left out) on rank 0; empty elsewhere. Collective."""
    full = get_model_state_dict(net, options=GATHER)
    return {name: full[name].contiguous() for name in names if name in full}


def gather_optimizer(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state by parameter name on rank 0 (engine.backends.torch_state's named layout);
    empty elsewhere. Collective."""
    return get_optimizer_state_dict(net, optimizer, options=GATHER)


def load_weights(net: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    set_model_state_dict(net, dict(tensors), options=SCATTER)


def load_optimizer(net: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> None:
    set_optimizer_state_dict(net, optimizer, named, options=SCATTER)
