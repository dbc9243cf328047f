"""The torch model: a transformers LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, SDPA attention) built from
LlamaConfig fields, so every checkpoint is a plain HF folder that `from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from engine.errors import UserError, shown
from engine.llama_json import META_KEYS


def hf_config(fields: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig from config.json fields (engine.model_config.llama_config's, or a checkpoint's)."""
    kwargs = {k: v for k, v in fields.items() if k not in META_KEYS}
    try:
        config = LlamaConfig(**kwargs)
    except Exception as e:  # noqa: BLE001 - strict-dataclass, Key and Attribute errors for the keys we do not check
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise UserError(f"invalid model config: {shown(first, 200)}") from None
    return finish_config(config)


def finish_config(config: LlamaConfig) -> LlamaConfig:
    """Training settings that are not part of the shape: SDPA attention, no KV cache. (The
    tokenizer's special ids arrive in the fields: engine.model_config.llama_config.)"""
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """Random init that depends only on the seed (the global torch RNG is reseeded here)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: tied input/output embeddings count once."""
    return sum(p.numel() for p in model.parameters())


def param_groups(model: LlamaForCausalLM, weight_decay: float) -> list[dict]:
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
    """Mean next-token cross-entropy of packed rows [batch, seq_len + 1]: x = row[:-1], y = row[1:]."""
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))


def masked_nll(model: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets `mask` keeps ([batch, seq_len] bool), the inputs
    at `positions`: position ids that restart per packed example, from which transformers builds the
    block-diagonal causal mask (engine.token_flags). A sum, so the caller divides by the trained
    targets of the whole step, not of this micro-batch."""
    logits = model(input_ids=rows[:, :-1], position_ids=positions).logits
    targets = rows[:, 1:].masked_fill(~mask, -100)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
