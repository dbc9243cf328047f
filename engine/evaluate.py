"""Eval metrics of a loaded checkpoint on packed rows: loss, perplexity, bits per byte, top-1/top-5.

Every row is [seq_len + 1] tokens: the model reads row[:-1] and is scored on the predicted targets
row[1:], so those targets are what "tokens evaluated" counts and what the bytes are bytes of:

    bpb = Σ target NLL (nats) / ln 2 / UTF-8 bytes of the text the targets stand for

which compares models with different tokenizers. With a byte-level tokenizer (`bytes`, `bpe:N`,
GPT-2 style HF ones) every token is a fixed run of raw bytes, so a per-token byte count is exact even
where a row boundary splits a character; other tokenizers decode each row's targets and count the
UTF-8 bytes of the text. Special tokens (the EOS between documents) stand for no text: their loss
counts, their bytes are 0. A target is a top-k hit when it is among the k highest logits
(torch.topk: a partial selection, about a third of the cost of the cross-entropy on CPU, where a
full comparison pass over the logits cost more than the cross-entropy itself).

Sums stay on the device until the end, so the loop costs the forward pass and little more.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine import eval_log
from engine import protocol as P
from engine.catalog import weights_hash
from engine.eval_data import EvalData
from engine.inference import LoadedModel
from engine.paths import Layout
from engine.token_flags import loss_mask, position_ids

LN2 = math.log(2.0)


@dataclass
class Metrics:
    nats: float
    tokens: int
    bytes: int
    top1_hits: int
    top5_hits: int
    seconds: float
    batches_done: int
    complete: bool = True

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float:
        return self.nats / LN2 / self.bytes if self.bytes else float("nan")

    @property
    def top1(self) -> float:
        return self.top1_hits / self.tokens if self.tokens else float("nan")

    @property
    def top5(self) -> float:
        return self.top5_hits / self.tokens if self.tokens else float("nan")

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def byte_lengths(tokenizer: object) -> np.ndarray | None:
    """Bytes each token id stands for when the tokenizer is byte-level (each character of a
    ByteLevel token is one byte), else None. Special tokens are 0; other added tokens are their text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (json.loads(backend.to_str()).get("decoder") or {}).get("type") != "ByteLevel":
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = max([*vocab.values(), *added.keys()]) + 1
    lengths = np.zeros(size, dtype=np.int64)
    for token, i in vocab.items():
        lengths[i] = len(token)
    for i, token in added.items():
        lengths[i] = 0 if token.special else len(token.content.encode("utf-8"))
    return lengths


def evaluate(loaded: LoadedModel, rows: np.ndarray, batch_size: int, *,
             on_batch: Callable[[int, int, int], None] | None = None,
             interrupted: Callable[[], bool] | None = None, flags: np.ndarray | None = None) -> Metrics:
    """Metrics over `rows` [n, seq_len + 1] in batches; `on_batch(done, total, tokens)` after each,
    and a stop between batches when `interrupted()` says so (the metrics then cover what was done).
    With `flags` (an instruction cache) only trained targets count, each packed example on its own."""
    device = loaded.device
    table = byte_lengths(loaded.tokenizer)
    lengths = torch.from_numpy(table).to(device) if table is not None else None
    zero = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    nats, top1, top5, n_bytes = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    decoded_bytes, tokens, done = 0, 0, 0
    total = math.ceil(len(rows) / batch_size)
    started = time.perf_counter()
    model = loaded.model
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            if interrupted is not None and interrupted():
                break
            batch = torch.from_numpy(np.ascontiguousarray(rows[start:start + batch_size], dtype=np.int64)).to(device)
            targets = batch[:, 1:].reshape(-1)
            part = None if flags is None else flags[start:start + batch_size]
            extra = {} if part is None else {"position_ids": torch.from_numpy(position_ids(part)).to(device)}
            with loaded.autocast():
                logits = model(input_ids=batch[:, :-1], **extra).logits
            logits = logits.reshape(-1, logits.size(-1)).float()
            keep = None if part is None else torch.from_numpy(loss_mask(part).reshape(-1)).to(device)
            if keep is not None:
                logits, targets = logits[keep], targets[keep]
            nats += F.cross_entropy(logits, targets, reduction="sum")
            hits = logits.topk(min(5, logits.size(-1)), dim=1).indices == targets[:, None]
            top1 += hits[:, 0].sum()
            top5 += hits.any(dim=1).sum()
            if lengths is not None:
                n_bytes += lengths[targets].sum()
            else:
                kept = batch[:, 1:].tolist() if keep is None else [targets.tolist()]
                texts = loaded.tokenizer.batch_decode(kept, skip_special_tokens=True)
                decoded_bytes += sum(len(t.encode("utf-8")) for t in texts)
            tokens += targets.numel()
            done += 1
            if on_batch is not None:
                on_batch(done, total, tokens)
    return Metrics(nats=float(nats), tokens=tokens, bytes=int(n_bytes) + decoded_bytes, top1_hits=int(top1),
                   top5_hits=int(top5), seconds=time.perf_counter() - started, batches_done=done,
                   complete=done == total)


def run_eval(loaded: LoadedModel, data: EvalData, layout: Layout, batch_size: int, *,
             emit: Callable[[P.Event], None], interrupted: Callable[[], bool] | None = None,
             request: str = "") -> P.EvalResult | None:
    """Measure, report progress and the result as events, and keep the result beside the model's
    checkpoints; None (nothing kept) when interrupted before the end."""
    def progress(done: int, total: int, tokens: int) -> None:
        emit(P.EvalProgress(checkpoint=loaded.display_name, batches_done=done, batches_total=total, tokens=tokens,
                            request=request))

    m = evaluate(loaded, data.rows, batch_size, on_batch=progress, interrupted=interrupted, flags=data.flags)
    if not m.complete:
        return None
    result = P.EvalResult(
        checkpoint=loaded.display_name, step=loaded.step, tokens_seen=loaded.tokens_seen, data=data.label,
        data_kind=data.kind, weights=weights_hash(loaded.path), loss=m.loss, perplexity=m.perplexity, bpb=m.bpb,
        top1=m.top1, top5=m.top5, tokens=m.tokens, bytes=m.bytes, tokens_per_sec=m.tokens_per_sec,
        seconds=m.seconds, device=str(loaded.device), precision=loaded.precision, request=request,
    )
    eval_log.append(layout, loaded.model_name, result)
    emit(result)
    return result
