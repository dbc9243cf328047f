"""A checkpoint loaded for use (eval, generation, chat): weights, tokenizer, device, and the facts
the run recorded about them.

Loading runs the full manifest check first (engine.checkpoint.verify), so a torn or corrupt
checkpoint is one error line, never a half-loaded model. A checkpoint folder is a Hugging Face model
folder, so transformers' own from_pretrained and AutoTokenizer load it, as they load an export.
Checkpoints are saved for training (use_cache False); here the KV cache is switched on, and the
generation defaults take EOS from the tokenizer the model was trained with, never from LlamaConfig's
placeholder ids.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import protocol as P
from engine.catalog import DISPLAY_RE, checkpoint_dirs, display_name, find_checkpoint
from engine.config import RunConfig
from engine.errors import UserError
from engine.paths import NAME_RE, Layout

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedModel:
    model: Any  # transformers LlamaForCausalLM, eval mode
    tokenizer: Any  # transformers fast tokenizer
    path: Path
    model_name: str
    display_name: str
    state: dict[str, Any]  # trainer_state.json
    device: torch.device
    precision: str
    context: int  # tokens per sequence the model was trained on
    eos_id: int
    n_params: int
    seconds: float  # load time

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def tokens_seen(self) -> int:
        value = self.state.get("tokens_seen")
        return value if isinstance(value, int) else 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def autocast(self) -> contextlib.AbstractContextManager:
        from engine.backends.torch_model import autocast

        return autocast(self.device, self.precision)

    def loaded_event(self) -> P.ModelLoaded:
        return P.ModelLoaded(
            checkpoint=self.display_name, path=str(self.path), step=self.step, tokens_seen=self.tokens_seen,
            n_params=self.n_params, vocab_size=self.vocab_size, context=self.context, device=str(self.device),
            precision=self.precision, chat_template=self.has_chat_template, seconds=self.seconds,
        )

    def run_config(self, layout: Layout) -> RunConfig | None:
        """The run's config (run.json beside the checkpoints), or None when it is gone or unreadable."""
        from engine.assemble import read_run_json

        try:
            return RunConfig.from_dict(read_run_json(layout, self.model_name).config)
        except UserError:
            return None


def resolve(layout: Layout, ref: str) -> Path:
    """A checkpoint folder from a display name, a folder, `<model>/checkpoint_<step>`, or a model name
    (its newest checkpoint that passes the full check)."""
    from engine.checkpoint import verify

    model_dir = layout.checkpoints_root / ref
    if NAME_RE.match(ref) and not DISPLAY_RE.match(ref) and model_dir.is_dir() and not model_dir.is_symlink():
        found = checkpoint_dirs(model_dir)
        for _, path in found:
            if verify(path) is None:
                return path
        raise UserError(f"model {ref!r} has no valid checkpoint" + (f" ({len(found)} failed their check)" if found else ""))
    return find_checkpoint(layout, ref)


def pick_device(choice: str) -> str:
    from engine.backends.torch_backend import pick_device as pick

    try:
        return pick(choice)
    except UserError:
        raise UserError(f"--device {choice}: no such device is available on this machine") from None


def pick_precision(choice: str, device: str) -> str:
    """`auto` is bf16 where the GPU has it and fp32 elsewhere: CPU inference gains little from bf16
    autocast and fp32 keeps results comparable to an export loaded anywhere."""
    if choice == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "fp16" and device != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA GPU; use bf16 or fp32 on {device}")
    return choice


def quiet_transformers() -> None:
    """Progress bars and advice from transformers would interleave with streamed text and events."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load(layout: Layout, ref: str, *, device: str = "auto", precision: str = "auto") -> LoadedModel:
    from engine.checkpoint import checked_state

    started = time.perf_counter()
    path = resolve(layout, ref)
    state = checked_state(path).to_dict()
    dev = pick_device(device)
    prec = pick_precision(precision, dev)
    quiet_transformers()
    from transformers import AutoModelForCausalLM, GenerationConfig

    from engine.backends.torch_finetune import merged_model
    from engine.backends.torch_model import count_params

    try:  # a LoRA checkpoint holds only its adapter: base plus adapter, merged
        model = (merged_model(path) or AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)).to(dev).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") \
            from None
    tokenizer = load_tokenizer(path)
    eos = eos_id(tokenizer, path)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, use_cache=True)
    cache = state.get("cache") if isinstance(state.get("cache"), dict) else {}
    context = cache.get("sequence_length")
    if type(context) is not int or context < 1:
        context = int(model.config.max_position_embeddings)
    model_name = path.parent.name
    run = state.get("run") if type(state.get("run")) is int else None
    return LoadedModel(
        model=model, tokenizer=tokenizer, path=path, model_name=model_name,
        display_name=display_name(model_name, int(state.get("step", 0)), run), state=state,
        device=torch.device(dev), precision=prec, context=context, eos_id=eos, n_params=count_params(model),
        seconds=time.perf_counter() - started,
    )


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.cache.metadata import IDS_FILE

    if (path / IDS_FILE).is_file() and not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"no tokenizer in {path}: its rows of token ids were packed without one (give "
                        "Trainer tokenizer= the tokenizer the ids came from)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        if (path / TOKENIZER_FILE).is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path / TOKENIZER_FILE))
        raise UserError(f"cannot load the tokenizer in {path}: {(str(e).strip().splitlines() or ['?'])[0]}") from None


def eos_id(tokenizer: Any, path: Path) -> int:
    """The end-of-text id documents were joined with when the cache was built."""
    from engine.cache.tokenizer import EOS_CANDIDATES

    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in EOS_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    raise UserError(f"the tokenizer in {path} has no end-of-text token")
