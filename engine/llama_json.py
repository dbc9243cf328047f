"""A user's LlamaConfig JSON (`--model-config`), checked without importing transformers.

transformers 5 refuses a bad LlamaConfig with strict-dataclass errors that are not ValueErrors, and
it accepts shapes that only fail inside the first forward pass (query heads that the key/value heads
do not divide, an odd head size that RoPE cannot rotate in pairs). The engine checks the fields it
knows here, when the run config is validated: before a cache is built and before torch is imported.
Keys it does not know go to transformers as they are.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.errors import UserError, shown
from engine.user_files import read_user_text

META_KEYS = {"architectures", "model_type", "transformers_version"}  # describe a file, not a shape
MAX_DIM = 1 << 24  # far beyond any real model's widths, depth or context; keeps a typo from allocating terabytes
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "pretraining_tp")
DEFAULTS = {"hidden_size": 4096, "num_attention_heads": 32}  # LlamaConfig's, for the cross-checks below
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
FRACTIONS = ("initializer_range", "attention_dropout")  # in [0, 1]
BOOLS = ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
MAPPINGS = ("rope_parameters", "rope_scaling")
ACTIVATIONS = ("gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
               "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu",
               "relu", "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu")


def read_llama_json(path: str) -> dict[str, Any]:
    """The LlamaConfig keyword arguments in `path`, checked; raises UserError naming the first problem.
    An integer where transformers wants a float (`"initializer_range": 0`) becomes one: its strict
    dataclass would refuse it."""
    text = read_user_text(path, "model config")
    try:
        kwargs = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"model config {path} is not valid JSON: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"model config {path} must be a JSON object of LlamaConfig fields")
    if kwargs.get("model_type", "llama") != "llama":
        raise UserError(f"model config {path} describes a {shown(kwargs['model_type'])} model; packtrain trains Llama models")
    kwargs = {k: v for k, v in kwargs.items() if k not in META_KEYS}
    _check_fields(kwargs, f"model config {path}")
    _check_shape(kwargs, f"model config {path}")
    return kwargs


def _check_fields(kwargs: dict[str, Any], where: str) -> None:
    def refuse(key: str, wanted: str) -> None:
        raise UserError(f"{where}: {key} must be {wanted}, got {shown(kwargs[key])}")

    for key in SIZES + OPTIONAL_SIZES:
        value = kwargs.get(key)
        if key in kwargs and not (value is None and key in OPTIONAL_SIZES) and not _int_in(value, 1, MAX_DIM):
            refuse(key, f"a positive integer (at most {MAX_DIM:,})")
    for key in POSITIVE_FLOATS + FRACTIONS:
        if key in kwargs:
            value = kwargs[key]
            if not _finite(value) or not (value > 0 if key in POSITIVE_FLOATS else 0 <= value <= 1):
                refuse(key, "a positive finite number" if key in POSITIVE_FLOATS else "a number in [0, 1]")
            kwargs[key] = float(value)
    for key in BOOLS:
        if key in kwargs and not isinstance(kwargs[key], bool):
            refuse(key, "true or false")
    for key in TOKEN_IDS:
        value = kwargs.get(key)
        ids = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
        if key in kwargs and value is not None and not all(_int_in(i, 0, MAX_DIM) for i in ids):
            refuse(key, "a token id (an integer >= 0)" + (" or a list of them" if key == "eos_token_id" else "") + " or null")
    for key in MAPPINGS:
        if kwargs.get(key) is not None and not isinstance(kwargs[key], dict):
            refuse(key, "an object or null")
    if "hidden_act" in kwargs and kwargs["hidden_act"] not in ACTIVATIONS:
        refuse("hidden_act", f"one of {', '.join(ACTIVATIONS)}")


def _check_shape(kwargs: dict[str, Any], where: str) -> None:
    hidden = kwargs.get("hidden_size", DEFAULTS["hidden_size"])
    heads = kwargs.get("num_attention_heads", DEFAULTS["num_attention_heads"])
    kv_heads = kwargs.get("num_key_value_heads") or heads
    head_dim = kwargs.get("head_dim") or hidden // heads
    if hidden % heads:
        raise UserError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise UserError(f"{where}: the head size {head_dim} is odd; rotary embeddings rotate pairs of channels")


def check_fits(kwargs: dict[str, Any], seq_len: int, where: str) -> None:
    """A model whose context is shorter than the cache's rows cannot train on them."""
    positions = kwargs.get("max_position_embeddings")
    if positions is not None and positions < seq_len:
        raise UserError(f"{where}: max_position_embeddings {positions} < seq_len {seq_len}")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite(value: Any) -> bool:
    """A JSON number that is neither NaN, nor Infinity, nor an integer too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
