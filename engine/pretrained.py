"""A pretrained model to fine-tune: where its folder is, what it can read, and which weights it holds.

Framework-free (JSON and file hashes), so config validation and the checkpoint commit use it without
torch. A local folder is always used as it is; a hub name goes through the local HF cache, and
when the hub is out of reach it fails at once (engine.cache.hub) instead of retrying for a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import xxhash

from engine.cache.hub import prepare_hub_access, unreachable
from engine.cache.naming import is_hub_name
from engine.config import ModelConfig, RunConfig
from engine.errors import UserError, shown
from engine.manifest import hash_file
from engine.model_config import read_config_json

BASE_FILE = "base_model.json"  # in an adapter checkpoint: which base it adapts, and that base's weights hash
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# LoRA targets by architecture (config.json model_type): every attention and MLP projection.
DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
DEFAULT_TARGETS.update({arch: DEFAULT_TARGETS["llama"] for arch in ("mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                                     "phi3", "olmo", "olmo2", "smollm3")})


def local_folder(source: str) -> Path | None:
    path = Path(os.path.expanduser(source))
    return path.resolve() if path.is_dir() else None


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's positions cover (rotary models may extrapolate, but untrained)."""
    value = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    return value if value and value > 0 else None


def check_local_model(source: str, seq_len: int) -> None:
    """Config-time checks: a path that is no folder, a seq_len beyond the model's context. A hub
    name is looked up only when the run starts."""
    folder = local_folder(source)
    if folder is None:
        if not is_hub_name(source):
            raise UserError(f"model.init_from {shown(source)} is neither a model folder nor a hub name")
    else:
        check_context(read_config_json(folder, "model folder"), seq_len, source)


def check_context(config: dict[str, Any], seq_len: int, source: str) -> None:
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise UserError(f"data.seq_len {seq_len:,} is longer than {source}'s context of {limit:,} tokens; "
                        f"pass --seq-len {limit} or less")


def resolve(source: str) -> Path:
    """The model's folder: a local one as is, a hub name's snapshot (downloaded, or from the HF
    cache when the hub is unreachable). One error line when neither exists."""
    folder = local_folder(source)
    if folder is not None:
        return folder
    if not is_hub_name(source):
        raise UserError(f"model.init_from {shown(source)} is neither a model folder nor a hub name")
    offline = prepare_hub_access()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES, local_files_only=offline is not None))
    except LocalEntryNotFoundError:
        raise unreachable("model", source, offline or "no connection", "a local model folder for --init-from") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot fetch model {source!r} from the hub: {shown(first, 200)}") from None


def check_method(method: str, device: str) -> None:
    """QLoRA's quantized base is a bitsandbytes CUDA kernel: refuse it before any work elsewhere."""
    if method != "qlora":
        return
    if device != "cuda":
        raise UserError(f"model.method qlora needs a CUDA GPU: bitsandbytes quantizes the base on CUDA only "
                        f"(this run is on {device}); use --method lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.method qlora needs bitsandbytes: pip install -e '.[qlora]'")


def weights_hash(folder: Path) -> str:
    """One hash over the weight files' names and xxh3 hashes: what a changed base is detected by."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise UserError(f"{folder} holds no weights (*.safetensors or *.bin)")
    h = xxhash.xxh3_64()
    for p in files:
        h.update(f"{p.name}:{hash_file(p)}\n".encode())
    return h.hexdigest()


def base_record(model: ModelConfig, folder: Path) -> dict[str, Any]:
    """What an adapter checkpoint records of its base (BASE_FILE; the backend adds the adapter's
    peft config): enough to rebuild base plus adapter without the run's config."""
    return {"init_from": model.init_from, "folder": str(folder), "weights_hash": weights_hash(folder),
            "model_type": read_config_json(folder, "model folder").get("model_type"), "model": asdict(model)}


def prepare(cfg: RunConfig) -> Path:
    """A new fine-tuning run's model folder; the cache is built with the model's own tokenizer."""
    m, d = cfg.model, cfg.data
    assert m.init_from is not None
    folder = resolve(m.init_from)
    check_context(read_config_json(folder, "model folder"), d.seq_len, m.init_from)
    d.tokenizer = m.init_from
    return folder


def check_vocab(folder: Path, vocab_size: int) -> None:
    """The cache's token ids must index the model's embedding."""
    model_vocab = read_config_json(folder, "model folder").get("vocab_size")
    if isinstance(model_vocab, int) and vocab_size > model_vocab:
        raise UserError(f"the cache's tokenizer has {vocab_size:,} tokens but {folder} embeds only {model_vocab:,}")


def base_folder(cfg: ModelConfig, checkpoint: Path) -> tuple[Path, dict[str, Any] | None]:
    """What a fine-tuning checkpoint is rebuilt from: an adapter's base (checked to be unchanged) and
    its record, or a full fine-tune's own folder (it holds every weight) and None."""
    record = read_base_record(checkpoint)
    if record is None:
        return checkpoint, None
    folder = resolve(cfg.init_from or record["init_from"])
    check_base(record, folder, f"checkpoint {checkpoint.name}")
    return folder, record


def check_base(recorded: dict[str, Any], folder: Path, where: str) -> None:
    """Refuse an adapter onto a base whose weights are not the ones it was trained on."""
    now = weights_hash(folder)
    if recorded.get("weights_hash") != now:
        raise UserError(f"{where} adapts {recorded.get('init_from')!r} with weights {str(recorded.get('weights_hash'))[:12]}, "
                        f"but {folder} now holds weights {now[:12]}: the base model changed")


def read_base_record(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / BASE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"checkpoint {checkpoint.name} has an unreadable {BASE_FILE}") from None
    if not isinstance(record, dict) or not isinstance(record.get("init_from"), str):
        raise UserError(f"checkpoint {checkpoint.name}: {BASE_FILE} does not name its base model")
    return record


def lora_targets(targets: str | None, model_type: str | None) -> list[str]:
    if targets:
        return [t.strip() for t in targets.split(",") if t.strip()]
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"no default LoRA targets for model type {model_type!r}; pass --lora-targets "
                        "(comma-separated module names, e.g. q_proj,v_proj)")
    return list(DEFAULT_TARGETS[model_type])
