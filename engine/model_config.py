"""The model's shape as Hugging Face LlamaConfig fields: a preset, or a user's LlamaConfig JSON checked
against the cache it will read. Plain dicts, so run assembly needs no framework; each backend builds
its model from them, and a checkpoint's config.json holds the same fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config import ModelConfig
from engine.errors import UserError
from engine.llama_json import META_KEYS, check_fits, read_llama_json
from engine.presets import get_preset

# transformers' LlamaConfig defaults for the fields a training model reads, so a backend that does
# not import transformers completes a partial config.json the way transformers would.
LLAMA_DEFAULTS: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 2048, "mlp_bias": False, "pad_token_id": None,
    "pretraining_tp": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def llama_config(model: ModelConfig, vocab_size: int, seq_len: int, token_ids: Mapping[str, int]) -> dict[str, Any]:
    """The preset's shape, or a user's LlamaConfig JSON checked against the cache it will read, with
    the special-token ids of the cache's tokenizer (`token_ids`: bos/eos/pad_token_id; LlamaConfig's
    defaults, bos 1 and eos 2, belong to another tokenizer: generate() would never stop at the real
    EOS). Every checkpoint's config.json and generation_config.json carry them."""
    if model.model_config is None:
        kwargs = get_preset(model.preset).llama_kwargs(vocab_size, seq_len)
    else:
        where = f"model config {model.model_config}"
        kwargs = read_llama_json(model.model_config)
        kwargs.setdefault("vocab_size", vocab_size)
        if kwargs["vocab_size"] < vocab_size:
            raise UserError(f"{where}: vocab_size {kwargs['vocab_size']} is smaller than the tokenizer's {vocab_size}")
        check_fits(kwargs, seq_len, where)
    return {**kwargs, **token_ids}


def read_config_json(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint's (or a pretrained model folder's) config.json; one error line when it is
    missing or not a JSON object."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} has no usable config.json: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{what} {path} has no usable config.json: not a JSON object")
    return config


def complete(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Every field a llama model reads, as config.json spells it for transformers 5 (rope_parameters)
    and for mlx-lm (rope_theta), with LlamaConfig's defaults where `fields` is silent."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise UserError(f"invalid model config: {', '.join(missing)} missing")
    out = {**LLAMA_DEFAULTS, **{k: v for k, v in fields.items() if k not in META_KEYS}}
    rope = {"rope_type": "default", **(out.pop("rope_parameters", None) or {})}
    rope["rope_theta"] = float(rope.get("rope_theta", out.pop("rope_theta", 10000.0)))
    heads = int(out["num_attention_heads"])
    if heads < 1 or int(out["hidden_size"]) % heads:
        raise UserError(f"invalid model config: hidden_size {out['hidden_size']} is not a multiple of "
                        f"num_attention_heads {heads}")
    out.setdefault("num_key_value_heads", heads)
    out.setdefault("head_dim", int(out["hidden_size"]) // heads)
    out.update(rope_parameters=rope, rope_theta=rope["rope_theta"], model_type="llama",
               architectures=["LlamaForCausalLM"], use_cache=False)
    return dict(sorted(out.items()))
