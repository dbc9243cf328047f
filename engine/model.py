"""The model: a transformers LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, SDPA attention) from a preset
or any LlamaConfig JSON, so every checkpoint is a plain HF folder that `from_pretrained` loads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from engine.config import ModelConfig
from engine.errors import UserError, shown
from engine.llama_json import check_fits, read_llama_json
from engine.presets import get_preset


def llama_config(model: ModelConfig, vocab_size: int, seq_len: int, token_ids: Mapping[str, int]) -> LlamaConfig:
    """The preset's shape, or a user's LlamaConfig JSON checked against the cache it will read, with
    the special-token ids of the cache's tokenizer (`token_ids`: bos/eos/pad_token_id)."""
    if model.model_config is None:
        kwargs = get_preset(model.preset).llama_kwargs(vocab_size, seq_len)
    else:
        where = f"model config {model.model_config}"
        kwargs = read_llama_json(model.model_config)
        kwargs.setdefault("vocab_size", vocab_size)
        if kwargs["vocab_size"] < vocab_size:
            raise UserError(f"{where}: vocab_size {kwargs['vocab_size']} is smaller than the tokenizer's {vocab_size}")
        check_fits(kwargs, seq_len, where)
    try:
        config = LlamaConfig(**kwargs)
    except Exception as e:  # noqa: BLE001 - strict-dataclass, Key and Attribute errors for the keys we do not check
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise UserError(f"invalid model config: {shown(first, 200)}") from None
    return finish_config(config, token_ids)


def finish_config(config: LlamaConfig, token_ids: Mapping[str, int] | None = None) -> LlamaConfig:
    """Settings that are not part of the shape: SDPA attention, no KV cache, and the tokenizer's
    special ids (LlamaConfig's defaults, bos 1 and eos 2, belong to another tokenizer: generate()
    would never stop at the real EOS). Set before the model is built, so its generation config and
    every checkpoint's config.json and generation_config.json carry them too."""
    config._attn_implementation = "sdpa"
    config.use_cache = False
    for key, value in (token_ids or {}).items():
        setattr(config, key, value)
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


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of packed rows [batch, seq_len + 1]: x = row[:-1], y = row[1:]."""
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
