"""Training memory of a preset, computed from its shapes (no torch): what must fit on the device.

The figures follow what engine/backends/torch_fast_llama.py keeps alive, per token of a micro-batch:
- each decoder layer: both norms' normalised inputs (fp32) and the matmul inputs after them, the
  rotated q|k and v with the attention output and its log-sum-exp, gate|up, silu(gate) and the
  MLP product;
- the final norm's input and the hidden-state gradient the fused loss computes in forward;
- with gradient checkpointing, only each layer's fp32 input, plus one layer's activations while
  it is recomputed.
Per micro-batch but not per token: each layer's concatenated q|k|v and gate|up weights (saved by
the matmuls for backward) and the LM head's gradient (fp32, computed with the loss). Forward peaks
with one chunk of logits alive; backward with the gradients and a working set about one layer wide.

Static memory: fp32 weights, fp32 gradients, AdamW's two fp32 moments, and under bf16 autocast the
bf16 copies of every weight that autocast caches for the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.presets import Preset, llama_param_count

FP32 = 4
LOSS_CHUNK_ELEMENTS = 1 << 23  # logits per chunk of engine.backends.torch_fast_llama's loss: 32 MiB in fp32
GIB = 1 << 30


@dataclass(frozen=True)
class Shapes:
    vocab: int
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool

    @classmethod
    def of(cls, preset: Preset, vocab: int) -> "Shapes":
        return cls(vocab, preset.d_model, preset.n_layers, preset.n_heads, preset.n_kv_heads,
                   preset.d_model // preset.n_heads, preset.ffn, preset.tie_embeddings)

    @property
    def n_params(self) -> int:
        return llama_param_count(self.vocab, self.d, self.layers, self.heads, self.kv_heads, self.ffn, self.tied)


@dataclass(frozen=True)
class MemoryPlan:
    n_params: int
    weights: int
    grads: int
    adamw: int
    autocast_copies: int
    saved: int  # kept from forward to backward, one micro-batch
    saved_checkpointed: int
    forward_transient: int  # one chunk of logits
    backward_transient: int  # one layer's gradient buffers

    def step_peak(self, checkpointing: bool) -> int:
        """What a step adds over weights, optimizer state and autocast copies: the larger of the
        forward peak (saved activations + logits chunk) and the backward one (saved activations +
        every gradient + working set; an upper bound, as activations are freed while gradients fill)."""
        saved = self.saved_checkpointed if checkpointing else self.saved
        return saved + max(self.forward_transient, self.grads + self.backward_transient)

    def total(self, checkpointing: bool) -> int:
        return self.weights + self.adamw + self.autocast_copies + self.step_peak(checkpointing)


def layer_bytes_per_token(s: Shapes, act: int) -> int:
    """Saved activations of one decoder layer per token; `act` is the matmul dtype's size."""
    norms = 2 * (FP32 * s.d + FP32 + act * s.d)
    attention = act * ((s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim) + FP32 * s.heads
    mlp = act * 4 * s.ffn
    return norms + attention + mlp


def layer_weight_copies(s: Shapes, act: int) -> int:
    """Concatenated q|k|v and gate|up weights one layer's matmuls keep for backward."""
    return act * s.d * ((s.heads + 2 * s.kv_heads) * s.head_dim + 2 * s.ffn)


def backward_working_set(s: Shapes, tokens: int) -> int:
    """Gradient buffers alive at once inside one layer's backward (fp32 upper bound)."""
    return FP32 * tokens * (4 * s.ffn + (s.heads + 2 * s.kv_heads) * s.head_dim + 2 * s.d)


def head_saved(s: Shapes, tokens: int) -> int:
    """Final norm input and the loss's hidden-state gradient per token, and the fp32 LM-head gradient
    the fused loss computes in forward."""
    return tokens * (2 * FP32 * s.d + FP32) + FP32 * s.vocab * s.d


def logits_chunk(s: Shapes, tokens: int, act: int) -> int:
    """One chunk of fp32 logits (softmaxed in place), and its matmul-dtype copy under autocast."""
    per_logit = FP32 + (0 if act == FP32 else act)
    return per_logit * min(max(1, LOSS_CHUNK_ELEMENTS // s.vocab), tokens) * s.vocab


def plan(s: Shapes, *, seq_len: int, micro_batch: int, precision: str) -> MemoryPlan:
    act = FP32 if precision == "fp32" else 2
    tokens = seq_len * micro_batch
    n = s.n_params
    layer = layer_bytes_per_token(s, act) * tokens + layer_weight_copies(s, act)
    head = head_saved(s, tokens)
    return MemoryPlan(
        n_params=n, weights=FP32 * n, grads=FP32 * n, adamw=2 * FP32 * n,
        autocast_copies=0 if precision == "fp32" else act * n,
        saved=s.layers * layer + head,
        saved_checkpointed=s.layers * FP32 * s.d * tokens + layer + head,
        forward_transient=logits_chunk(s, tokens, act),
        backward_transient=backward_working_set(s, tokens),
    )


def largest_micro_batch(s: Shapes, *, seq_len: int, precision: str, budget: int, checkpointing: bool,
                        limit: int = 4096) -> int:
    """The largest micro-batch whose plan fits `budget` bytes (0 when not even one row fits)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(s, seq_len=seq_len, micro_batch=mid, precision=precision).total(checkpointing) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
