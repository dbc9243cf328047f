"""The torch model: a Llama (RMSNorm, RoPE, SwiGLU, SDPA attention) built from LlamaConfig fields, so
every checkpoint is a plain HF folder that `from_pretrained` loads.

Two implementations hold the same tensors under the same names: packtrain's lean one
(torch_fast_llama, the default) and transformers' LlamaForCausalLM (`PACKTRAIN_MODEL_IMPL=hf`, for
interop checks and for configs the lean one refuses). transformers is imported only for the latter.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from engine.backends.torch_fast_llama import IGNORE
from engine.backends.torch_fast_llama import LlamaForCausalLM as FastLlama
from engine.backends.torch_state import unwrap
from engine.errors import UserError, shown
from engine.llama_json import META_KEYS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ENV_IMPL = "PACKTRAIN_MODEL_IMPL"
IMPLS = ("fast", "hf")
Impl = Literal["fast", "hf"]


def hf_config(fields: Mapping[str, Any]) -> "PretrainedConfig":
    """A LlamaConfig from config.json fields (engine.model_config.llama_config's, or a checkpoint's)."""
    from transformers import AutoConfig, LlamaConfig

    kwargs = {k: v for k, v in fields.items() if k not in META_KEYS}
    model_type = fields.get("model_type", "llama")
    try:
        # another architecture: a fine-tuned pretrained model's checkpoint (engine.backends.torch_finetune)
        config = LlamaConfig(**kwargs) if model_type == "llama" else AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # noqa: BLE001 - strict-dataclass, Key and Attribute errors for the keys we do not check
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise UserError(f"invalid model config: {shown(first, 200)}") from None
    return finish_config(config)


def finish_config(config: "PretrainedConfig") -> "PretrainedConfig":
    """Training settings that are not part of the shape: SDPA attention, no KV cache. (The
    tokenizer's special ids arrive in the fields: engine.model_config.llama_config.)"""
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def model_impl(impl: str | None = None) -> Impl:
    """`impl`, else $PACKTRAIN_MODEL_IMPL, else "fast"."""
    chosen = impl or os.environ.get(ENV_IMPL) or "fast"
    if chosen not in IMPLS:
        raise UserError(f"{ENV_IMPL} must be one of {', '.join(IMPLS)}, got {chosen!r}")
    return chosen  # type: ignore[return-value]


def build_model(fields: Mapping[str, Any], seed: int, *, impl: str | None = None) -> torch.nn.Module:
    """A model from config.json fields; random init that depends only on the seed (the global torch
    RNG is reseeded here). Llamas train on the fast model unless `impl` (or $PACKTRAIN_MODEL_IMPL)
    says hf; other architectures (a fine-tuned pretrained model's checkpoint) are transformers'."""
    fast = model_impl(impl) == "fast" and fields.get("model_type", "llama") == "llama"
    config = None if fast else hf_config(fields)  # refuse bad fields before reseeding
    torch.manual_seed(seed)
    if config is None:
        return FastLlama(fields)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(config) if isinstance(config, LlamaConfig) else AutoModelForCausalLM.from_config(config)


def generating_view(net: torch.nn.Module) -> torch.nn.Module:
    """A model with transformers' `generate` over the same parameter tensors (so it always samples the
    current weights): `net` itself, or for the fast model a transformers Llama sharing its storage."""
    if not isinstance(net, FastLlama):
        return net
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # its throw-away init draws nothing from the run's generator
        view = LlamaForCausalLM(hf_config(net.fields))
    view.load_state_dict(net.state_dict(), assign=True)
    return view.to(net.lm_head.weight.device)  # the RoPE buffers; the parameters are already there


def config_json(net: torch.nn.Module) -> dict[str, Any]:
    """config.json as save_pretrained writes it; the fast model's fields are already that shape."""
    if isinstance(net, FastLlama):
        return {**net.fields, "transformers_version": version("transformers")}
    return {**json.loads(net.config.to_json_string()), "architectures": [type(net).__name__]}


def generation_json(net: torch.nn.Module) -> str | None:
    """generation_config.json: the special ids, as GenerationConfig.from_model_config records them."""
    if not isinstance(net, FastLlama):
        generation = getattr(net, "generation_config", None)
        return None if generation is None else generation.to_json_string()
    f = net.fields
    return json.dumps({"_from_model_config": True, "bos_token_id": f["bos_token_id"], "eos_token_id": f["eos_token_id"],
                       "output_attentions": False, "output_hidden_states": False, "pad_token_id": f["pad_token_id"],
                       "transformers_version": version("transformers"), "use_cache": False}, indent=2) + "\n"


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: tied input/output embeddings count once."""
    return sum(p.numel() for p in model.parameters())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the projection matrices only.

    Norm gains and biases are scales and offsets that decay would pull towards zero for no
    regularising benefit; the token embedding is excluded too, because decay shrinks the rows of
    rare tokens, which get few gradient updates to push back.
    """
    embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and p is not embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context forward passes run under: nothing for fp32, torch autocast for bf16 and fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of packed rows [batch, seq_len + 1]: x = row[:-1], y = row[1:].

    `model` may be wrapped (DDP, torch.compile); it is called through the wrapper either way. The
    fast model computes the loss itself, chunk by chunk, without the full logits."""
    if isinstance(unwrap(model), FastLlama):
        return model(rows[:, :-1], targets=rows[:, 1:])
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))


def masked_nll(model: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets `mask` keeps ([batch, seq_len] bool), the inputs
    at `positions`: position ids that restart per packed example, from which transformers builds the
    block-diagonal causal mask (engine.token_flags). A sum, so the caller divides by the trained
    targets of the whole step, not of this micro-batch."""
    targets = rows[:, 1:].masked_fill(~mask, IGNORE)
    if isinstance(unwrap(model), FastLlama):
        return model(rows[:, :-1], targets=targets, position_ids=positions, total=True)
    logits = model(input_ids=rows[:, :-1], position_ids=positions).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
