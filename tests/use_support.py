"""Helpers for the tests of eval, generation, chat, compare and serve-model: checkpoints made in
process (a random tiny Llama saved by the real Checkpointer) and a locally made HF tokenizer folder.

A made checkpoint has no run behind it, so it has no held-out chunks: tests that need the run's
own eval train a tiny model instead (tests/test_use_model.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.checkpoint import Checkpointer
from engine.paths import Layout

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def bytes_tokenizer_folder(folder: Path) -> Path:
    """The `bytes` tokenizer as a cache writes it (256 byte ids, EOS 256)."""
    from engine.cache.tokenizer import EOS_TOKEN, _bytes_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _bytes_tokenizer().save(str(folder / "tokenizer.json"))
    specials = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **specials}))
    return folder


def hf_tokenizer_folder(folder: Path, *, chat_template: bool = True) -> Path:
    """A SentencePiece-style tokenizer (Metaspace, BPE with byte fallback; not byte-level), saved by
    transformers like any hub tokenizer, optionally with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["</s>", *(f"<0x{i:02X}>" for i in range(256))])
    tok.train_from_iterator(["the cat sat on the mat while the dog ran far away"] * 20, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(folder))
    return folder


def make_checkpoint(layout: Layout, model_name: str, tokenizer_dir: Path, *, context: int, seed: int = 0,
                    step: int = 1) -> Path:
    """A random tiny Llama for `tokenizer_dir`'s vocabulary, trained on nothing, saved as step `step`
    of run 1 with a context of `context` tokens. Its EOS embedding is zero, so greedy decoding never
    ends a sample early (every other logit's maximum is positive)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.backends.torch_backend import TorchBackend
    from engine.backends.torch_model import finish_config
    from engine.config import RunConfig, TrainConfig
    from engine.presets import PRESETS

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = max(tokenizer.get_vocab().values()) + 1
    torch.manual_seed(seed)
    model = LlamaForCausalLM(finish_config(LlamaConfig(**PRESETS["tiny"].llama_kwargs(vocab, context))))
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.eos_token_id].zero_()
    state = made_state(step, context, vocab)
    backend = TorchBackend(RunConfig(train=TrainConfig(device="cpu", precision="fp32")), layout)
    backend.adopt(model, None)
    return Checkpointer(layout, model_name).save(step=step, backend=backend, optimizer=False, trainer_state=state,
                                                 tokenizer_dir=tokenizer_dir).path


def made_state(step: int, context: int, vocab: int) -> dict:
    """A trainer state of the real shape (engine.state checks every field) for a run that never ran:
    one sequence, one step per epoch, no held-out chunks."""
    from dataclasses import asdict

    from engine.schedule import Schedule
    from engine.backends.torch_backend import rng_state

    schedule = Schedule(kind="constant", peak_lr=1e-3, min_lr=1e-3, warmup_steps=0, total_steps=max(step, 1))
    return {
        "run": 1, "step": step, "tokens_seen": 0, "loss": None, "eval_loss": None, "best_eval_loss": None,
        "saved_at": 0.0, "elapsed_s": 0.0, "epoch": 0, "cursor": 0, "growth_events": [],
        "data": {"seed": 1, "window_rows": 1, "train_chunks": [[0, 1]], "eval_chunks": []},
        "plan": {"schedule": schedule.to_dict(), "global_batch": 1, "n_sequences": 1},
        "total_steps": max(step, 1), "scaler": None, "rng": asdict(rng_state()),
        "cache": {"dataset_name": "none", "path": "", "total_sequences": 1, "sequence_length": context,
                  "generation": 0, "manifest_hash": "", "tokenizer_sha256": "", "consumed_manifest_hash": "",
                  "dtype": "uint16", "vocab_size": vocab},
        "config_hash": "none", "world_size": 1, "global_batch": 1, "precision": "fp32", "versions": {},
    }
