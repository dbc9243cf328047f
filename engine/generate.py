"""Sampling from a loaded checkpoint with transformers' own generate: a GenerationConfig and its
logits processors (temperature, top-k, top-p, repetition penalty), the KV cache, a streamer and
stopping criteria. Nothing here picks tokens itself.

- Prompts are encoded the way documents were for the cache (no BOS; special-token text is text),
  and an empty prompt starts from EOS, i.e. at the start of a new document. Chat prompts go through
  the tokenizer's chat template, whose special tokens are meant.
- Prompt and new tokens share the context the model was trained on: a prompt that leaves no room
  for max_new_tokens keeps its last tokens, and the caller is told how many it lost.
- Sample i of a request is seeded with seed + i: the same seed gives the same text (on the same
  device), and any one sample can be repeated alone.
- Text streams as deltas of the decoded new tokens. A character whose bytes are not all there yet,
  and text that may be the start of a stop string, wait until they resolve; a stop string ends the
  sample and is not part of its text.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine import protocol as P
from engine.errors import UserError
from engine.inference import LoadedModel

DEFAULT_NEW_TOKENS = 128
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to

Emit = Callable[[P.Event], None]


@dataclass
class Prompt:
    ids: list[int]
    dropped: int = 0  # tokens cut from the front to fit the context


@dataclass
class Sample:
    text: str
    reason: str  # eos | length | stop | interrupted
    ids: list[int]  # new token ids
    seconds: float
    first_token_s: float | None


def encode(loaded: LoadedModel, text: str) -> list[int]:
    ids = loaded.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(ids) or [loaded.eos_id]


def encode_chat(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    try:
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template is user code (jinja); its failure is one line
        raise UserError(f"the chat template of {loaded.display_name} failed: {e}") from None
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) or [loaded.eos_id]


def new_token_budget(params: P.SamplingParams, context: int) -> int:
    if params.max_new_tokens is None:
        return max(1, min(DEFAULT_NEW_TOKENS, context // 2))
    if params.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens (at most {context - 1})")
    return params.max_new_tokens


def fit(ids: list[int], context: int, new_tokens: int) -> Prompt:
    room = context - new_tokens
    return Prompt(ids[-room:], len(ids) - room) if len(ids) > room else Prompt(list(ids))


def generation_config(params: P.SamplingParams, eos_id: int, new_tokens: int) -> GenerationConfig:
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "eos_token_id": eos_id, "pad_token_id": eos_id,
                              "use_cache": True, "repetition_penalty": params.repetition_penalty or 1.0}
    if params.temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=float(params.temperature), top_k=params.top_k or 0,
                      top_p=params.top_p or 1.0)
    return GenerationConfig(**kwargs)


def visible(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """The part of the decoded text that can be shown now, and whether a stop string was reached."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], True
    if final:
        return text, False
    hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    shown = text[:len(text) - hold]
    return shown.rstrip(REPLACEMENT) if shown.endswith(REPLACEMENT) else shown, False


class TextDeltas(BaseStreamer):
    """Receives token ids from generate (the prompt first), hands new text to `on_text`."""

    def __init__(self, tokenizer: Any, stops: list[str], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.text = ""  # everything visible so far (what the sample's text is if it ends now)
        self.shown = ""  # what on_text was given: text, unless a decode rewrote earlier text
        self.hit = False
        self.prompt_seen = False
        self.started = time.perf_counter()
        self.first_token_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.ids += value.reshape(-1).tolist()
        self._update(final=False)

    def end(self) -> None:
        self._update(final=True)

    def _update(self, final: bool) -> None:
        if self.hit:
            return
        self.text, self.hit = visible(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops, final)
        if self.text.startswith(self.shown) and len(self.text) > len(self.shown):
            self.on_text(self.text[len(self.shown):])
            self.shown = self.text


class StopOnText(StoppingCriteria):
    """Ends the sample once a stop string appears in the decoded new tokens."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str]) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len:].tolist(), skip_special_tokens=True)
        return _all(input_ids, any(s in text for s in self.stops))


@dataclass
class StopWhen(StoppingCriteria):
    """Ends the sample when `interrupted()` says so (a stop command read by another thread)."""

    interrupted: Callable[[], bool]
    fired: bool = field(default=False)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or self.interrupted()
        return _all(input_ids, self.fired)


def _all(input_ids: torch.Tensor, flag: bool) -> torch.BoolTensor:
    return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def sample(loaded: LoadedModel, prompt_ids: list[int], params: P.SamplingParams, seed: int, new_tokens: int, *,
           on_text: Callable[[str], None], interrupted: Callable[[], bool] = lambda: False) -> Sample:
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
    streamer = TextDeltas(loaded.tokenizer, params.stop, on_text)
    stop_flag = StopWhen(interrupted)
    criteria = StoppingCriteriaList([stop_flag])
    if params.stop:
        criteria.append(StopOnText(loaded.tokenizer, len(prompt_ids), params.stop))
    with torch.inference_mode(), loaded.autocast():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                    stopping_criteria=criteria,
                                    generation_config=generation_config(params, loaded.eos_id, new_tokens))
    new = out[0, len(prompt_ids):].tolist()
    if streamer.hit:
        reason = "stop"
    elif stop_flag.fired:
        reason = "interrupted"
    elif new and new[-1] == loaded.eos_id:
        reason = "eos"
    else:
        reason = "length"
    return Sample(text=streamer.text, reason=reason, ids=new, seconds=time.perf_counter() - streamer.started,
                  first_token_s=streamer.first_token_s)


def run(loaded: LoadedModel, ids: list[int], params: P.SamplingParams, *, emit: Emit,
        interrupted: Callable[[], bool] = lambda: False, request: str = "") -> list[Sample]:
    """Every sample of one request as events: generation_started, token..., generation_done each.
    An interrupted sample ends the request."""
    new_tokens = new_token_budget(params, loaded.context)
    prompt = fit(ids, loaded.context, new_tokens)
    if prompt.dropped:
        emit(P.Warning(message=f"the prompt is {len(ids):,} tokens: kept its last {len(prompt.ids):,} so that it and "
                               f"{new_tokens:,} new tokens fit the model's context of {loaded.context:,}"))
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    samples = []
    for i in range(params.num_samples):
        emit(P.GenerationStarted(request=request, sample=i, samples=params.num_samples, seed=seed + i,
                                 prompt_tokens=len(prompt.ids), prompt_dropped=prompt.dropped,
                                 max_new_tokens=new_tokens))
        done = sample(loaded, prompt.ids, params, seed + i, new_tokens, interrupted=interrupted,
                      on_text=lambda text, i=i: emit(P.Token(text=text, request=request, sample=i)))
        emit(P.GenerationDone(text=done.text, reason=done.reason, request=request, sample=i,  # type: ignore[arg-type]
                              new_tokens=len(done.ids), seconds=done.seconds, first_token_s=done.first_token_s,
                              tokens_per_sec=len(done.ids) / done.seconds if done.seconds > 0 else 0.0))
        samples.append(done)
        if done.reason == "interrupted":
            break
    return samples


def training_sampler(net: Any, tokenizer_dir: Path, eos: int, *, device: torch.device, precision: str,
                     context: int) -> Callable[[str, P.SamplingParams], tuple[str, int]]:
    """Samples during training (engine.train_samples) from the model being trained, through the same
    `sample` as a loaded checkpoint: (text, new tokens). The model is in eval mode only meanwhile."""
    from engine.backends.torch_model import count_params
    from engine.inference import load_tokenizer

    loaded = LoadedModel(model=net, tokenizer=load_tokenizer(tokenizer_dir), path=tokenizer_dir, model_name="",
                         display_name="", state={}, device=device, precision=precision, context=context, eos_id=eos,
                         n_params=count_params(net), seconds=0.0)

    def generate(prompt: str, params: P.SamplingParams) -> tuple[str, int]:
        new_tokens = new_token_budget(params, context)
        ids = fit(encode(loaded, prompt), context, new_tokens).ids
        training = net.training
        net.eval()
        try:
            done = sample(loaded, ids, params, params.seed or 0, new_tokens, on_text=lambda _: None)
        finally:
            net.train(training)
        return done.text, len(done.ids)

    return generate
