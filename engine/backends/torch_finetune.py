"""Fine-tuning in torch: any causal LM transformers loads, trained whole or through a peft LoRA adapter
(QLoRA: the same adapter on a 4- or 8-bit bitsandbytes base, which exists on CUDA only).

An adapter run's trainable tensors are the adapter's alone, under peft's live names; the export
turns them into peft's saved layout (adapter_model.safetensors) or merges them into the base.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.catalog import MODEL_FILE
from engine.config import ModelConfig, TrainConfig
from engine.errors import UserError, shown
from engine.pretrained import lora_targets

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for the one adapter; it appears in live parameter names only


def base_dtype(m: ModelConfig, precision: str) -> torch.dtype:
    """A full fine-tune keeps fp32 master weights (autocast computes in low precision); a frozen base
    is stored in the compute precision, since nothing accumulates into it."""
    if m.method == "full" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def load_causal_lm(folder: Path, m: ModelConfig, precision: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": base_dtype(m, precision)}
    if m.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
            if m.quant_bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load on stderr, in every run log and test output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load model {folder}: {shown(first, 200)}") from None
    model.config.use_cache = False
    return model if m.method == "qlora" else model.to(device)


def enable_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5.24 deprecates the old name (a FutureWarning; gone in v6); older ones have only it
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_config(m: ModelConfig, model_type: str | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=lora_targets(m.lora_targets, model_type), task_type="CAUSAL_LM",
                      fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D stores weights transposed


def with_adapter(model: torch.nn.Module, m: ModelConfig, t: TrainConfig) -> torch.nn.Module:
    """A fresh LoRA adapter (initialised from train.seed) on a frozen base."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if m.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if t.grad_checkpointing:
        model.enable_input_require_grads()  # a frozen embedding's output needs grads for checkpointed blocks
    torch.manual_seed(t.seed)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers a deprecated question (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lora_config(m, getattr(model.config, "model_type", None)))
    except ValueError as e:  # target modules that the model does not have
        raise UserError(f"cannot add a LoRA adapter: {shown(' '.join(str(e).split()), 200)}") from None


def load_finetune_model(folder: Path, m: ModelConfig, t: TrainConfig, precision: str,
                        device: torch.device) -> torch.nn.Module:
    """The model a fine-tuning run trains: the pretrained weights, whole or under a fresh adapter."""
    model = load_causal_lm(folder, m, precision, device)
    if t.grad_checkpointing:
        enable_checkpointing(model)
    return with_adapter(model, m, t) if m.adapter else model


def base_model(net: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (itself otherwise)."""
    get_base = getattr(net, "get_base_model", None)
    return get_base() if callable(get_base) else net


def trainable_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def adapter_config(net: torch.nn.Module, source: str) -> dict[str, Any]:
    """adapter_config.json as peft writes it, naming the base as the run was given it."""
    config = net.peft_config[ADAPTER_NAME].to_dict()
    config.update(base_model_name_or_path=source, inference_mode=True)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def saved_adapter_name(live: str) -> str:
    """peft's file layout drops the adapter's name from the live parameter name."""
    return live.replace(f".{ADAPTER_NAME}.", ".")


def n_trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# --- export ---------------------------------------------------------------------------------------


def adapter_model(checkpoint: Path, record: dict[str, Any]) -> torch.nn.Module:
    """Base plus the checkpoint's adapter on the CPU in fp32, the base checked to be the one trained
    on (a QLoRA adapter goes onto the unquantized base: merging into 4-bit weights would round it)."""
    from engine.pretrained import check_base, resolve

    m = replace(ModelConfig(**record["model"]), method="lora")
    folder = resolve(m.init_from or record["init_from"])
    check_base(record, folder, f"checkpoint {checkpoint.name}")
    net = with_adapter(load_causal_lm(folder, m, "fp32", torch.device("cpu")), m, TrainConfig())
    tensors = load_file(str(checkpoint / MODEL_FILE))
    missing = set(trainable_tensors(net)) - set(tensors)
    if missing:
        raise UserError(f"checkpoint {checkpoint.name} does not hold this adapter (e.g. {sorted(missing)[0]})")
    net.load_state_dict(tensors, strict=False)
    return net


def export_adapter(checkpoint: Path, out: Path) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) plus the tokenizer,
    which PeftModel.from_pretrained loads onto the base."""
    from engine.checkpoint import copy_tokenizer
    from engine.pretrained import read_base_record

    record = read_base_record(checkpoint)
    assert record is not None
    tensors = load_file(str(checkpoint / MODEL_FILE))
    save_file({saved_adapter_name(k): v for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(record["adapter_config"], indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    copy_tokenizer(checkpoint, out)


def merged_model(checkpoint: Path) -> torch.nn.Module | None:
    """An adapter checkpoint as one plain model of the base's architecture (the adapter folded into
    its weights, fp32 on the CPU); None for a checkpoint that holds a whole model."""
    from engine.pretrained import read_base_record

    record = read_base_record(checkpoint)
    if record is None:
        return None
    merged = adapter_model(checkpoint, record).merge_and_unload()
    merged.config.use_cache = True
    return merged


def export_merged(checkpoint: Path, out: Path) -> None:
    """The base's architecture with the adapter folded into its weights: a plain HF model folder."""
    from engine.checkpoint import copy_tokenizer

    merged = merged_model(checkpoint)
    assert merged is not None
    merged.save_pretrained(str(out))
    copy_tokenizer(checkpoint, out)
