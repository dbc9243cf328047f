"""A torch model's weights and AdamW state as named tensors, in the layout every backend shares:
HF names for weights (tied weights once), `<param>/<key>` for optimizer state plus JSON groups.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import UserError
from engine.state import OptimizerState, is_number


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = next((m for attr in ("module", "_orig_mod")
                      if isinstance(m := getattr(model, attr, None), torch.nn.Module)), None)
        if inner is None:
            return model
        model = inner


# --- model weights --------------------------------------------------------------------------------


def hf_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as HF writes it: tied weights (lm_head -> embed_tokens) stored once under the
    source name, so the file loads in transformers, mlx_lm and converters alike."""
    sd = net.state_dict()
    return {name: sd[name].detach().cpu().contiguous() for name in stored_names(net, sd)}


def stored_names(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Names that own their storage; a tied copy is left out because loading fills it anyway."""
    tied_targets = set(getattr(net, "_tied_weights_keys", None) or ())
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    kept = []
    for name in sorted(sd, key=lambda n: n in tied_targets):  # sources before tied targets
        tensor = sd[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept.append(name)
    return sorted(kept)


def weight_shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    sd = net.state_dict()
    return {name: tuple(sd[name].shape) for name in stored_names(net, sd)}


# --- optimizer state ------------------------------------------------------------------------------


def param_names(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in net.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds parameters that are not the model's") from None


def named_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name, as torch.distributed.checkpoint's
    get_optimizer_state_dict returns it: {"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}."""
    sd = optimizer.state_dict()
    state, groups = {}, []
    for group, names in zip(sd["param_groups"], param_names(net, optimizer)):
        state.update({name: sd["state"][index] for index, name in zip(group["params"], names) if index in sd["state"]})
        groups.append({**group, "params": names})
    return {"state": state, "param_groups": groups}


def flatten_optimizer(named: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors `<param>/<key>` for safetensors, and JSON-safe {param_groups, scalars} for the state,
    from the state by name (named_optimizer_state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in named["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = _json_value(value)
    groups = [{k: _json_value(v) for k, v in group.items() if k != "params"} | {"params": list(group["params"])}
              for group in named["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _json_value(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return v


def load_optimizer(by_param: Mapping[str, Mapping[str, torch.Tensor]], saved: OptimizerState,
                   net: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Restore state saved by flatten_optimizer (or another backend in the same layout), checked
    against the live optimizer (engine.checkpoint.load_optimizer has checked names and shapes)."""
    named = restored_optimizer_state(by_param, saved, net, optimizer, where)
    index = {name: i for i, name in enumerate(name for group in named["param_groups"] for name in group["params"])}
    optimizer.load_state_dict({
        "state": {index[name]: entry for name, entry in named["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in named["param_groups"]]})


def restored_optimizer_state(by_param: Mapping[str, Mapping[str, torch.Tensor]], saved: OptimizerState,
                             net: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str) -> dict[str, Any]:
    """The saved state by parameter name (named_optimizer_state's layout) for the live optimizer:
    groups are matched by position and parameters by name."""
    current = param_names(net, optimizer)
    param_groups = []
    for i, (group, live, names) in enumerate(zip(saved.param_groups, optimizer.param_groups, current)):
        restored = _restored_group(group, live, optimizer, f"{where}: param group {i}")
        param_groups.append({**restored, "params": names})
    state: dict[str, dict[str, Any]] = {}
    for name in (name for names in current for name in names):
        entry: dict[str, Any] = dict(by_param.get(name, {}))
        entry.update(saved.scalars.get(name, {}))
        if entry:
            state[name] = entry
    return {"state": state, "param_groups": param_groups}


def _restored_group(saved: dict[str, Any], live: dict[str, Any], optimizer: torch.optim.Optimizer,
                    where: str) -> dict[str, Any]:
    """A saved param group as load_state_dict takes it (it replaces the live group whole). Numbers
    (lr, betas, eps, weight_decay) come from the checkpoint and must pass the optimizer's own
    constructor checks; everything else is the live optimizer's, built from the same config for this
    process's device: flags the saved tensors may not match (amsgrad) would fail at the first step."""
    restored = {k: v for k, v in live.items() if k != "params"}
    for key, value in saved.items():
        current = live.get(key)
        if key not in restored or current is None or isinstance(current, bool):
            continue
        ok = (isinstance(value, list) and len(value) == len(current) and all(is_number(v) for v in value)
              if isinstance(current, (tuple, list)) else is_number(value) if is_number(current) or torch.is_tensor(current)
              else isinstance(value, type(current)))
        if not ok:
            raise UserError(f"{where} has {key} = {str(value)[:40]}, where the optimizer has {current!r}")
        restored[key] = tuple(value) if isinstance(current, tuple) else value
    accepted = inspect.signature(type(optimizer).__init__).parameters
    try:
        type(optimizer)([torch.zeros(1, requires_grad=True)], **{k: v for k, v in restored.items() if k in accepted})
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{where}: {' '.join(str(e).split())[:120]}") from None
    return restored
