"""A lean Llama for training: the maths and the tensor names of transformers' LlamaForCausalLM, in
fewer and larger operations.

Why not the transformers class itself: its step spends a third of its time outside the matmuls, in
small element-wise kernels (RMSNorm as five ops in each direction, RoPE as neg + cat + 3 ops on q
and on k, three separate input-gradient sums per projection group) and in a full fp32 logits tensor
that log-softmax reads and writes twice more. Here:

- q/k/v and gate/up run as one matmul each (weights concatenated per step: a copy of a few MB,
  against input gradients that would otherwise be summed branch by branch);
- RoPE uses cos/sin tables computed once (non-persistent buffers) and is applied to q and k in one
  pass;
- attention is SDPA with `is_causal=True` and native GQA: no mask tensor is ever built;
- the loss is a chunked linear + cross-entropy that computes its gradients while the logits of a
  chunk are hot and never keeps more than one chunk of them.

The parameters keep the Hugging Face names and shapes, so `state_dict()` is a transformers
LlamaForCausalLM state dict and `load_state_dict()` takes one; checkpoints and exports stay plain
HF folders. The class is named LlamaForCausalLM because checkpoints record the class name as the
architecture that loads them.

It is built from config.json fields (engine.model_config.complete), not a transformers LlamaConfig,
so training and resuming never import transformers: that import alone took 5-7 s of the 8-12 s a
resume spent before its first step. Only RoPE variants other than the default borrow transformers'
table functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import UserError
from engine.memory_plan import LOSS_CHUNK_ELEMENTS
from engine.model_config import complete

# RoPE variants whose tables do not depend on the sequence being run (up to max_position_embeddings).
STATIC_ROPE = {"default", "linear", "dynamic", "yarn", "llama3"}
# transformers' ACT2FN entries a Llama config may name
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def rope_tables(c: Mapping[str, Any], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position_embeddings, head_dim / 2] in fp32, computed as transformers does."""
    rope = c["rope_parameters"]
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise UserError(f"rope_type {rope_type!r} is not supported by the fast model; "
                        "train it with PACKTRAIN_MODEL_IMPL=hf")
    if rope_type == "default":
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        from engine.backends.torch_model import hf_config

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config(c), None)
    positions = torch.arange(c["max_position_embeddings"], dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * scaling, freqs.sin() * scaling


class RopeQKV(torch.autograd.Function):
    """Split a fused projection [batch, seq, (heads + 2 kv) * head_dim] into RoPE-rotated q|k
    [batch, seq, heads + kv, head_dim] and v, in the half-split layout of transformers
    (x1 * cos - x2 * sin | x2 * cos + x1 * sin; its cos/sin tables repeat one half, so [seq,
    head_dim / 2] tables suffice).

    Written out because autograd would save the halves, zero-fill and copy a full-size gradient
    for each slice and sum them; here backward is the inverse rotation and one concatenation, and
    nothing but the tables is saved.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,  # type: ignore[override]
                n_rot: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = qkv.shape[:2]
        x = qkv.view(b, t, -1, head_dim)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [seq | batch, seq, 1, head_dim / 2]
        half = head_dim // 2
        x1, x2 = x[:, :, :n_rot, :half], x[:, :, :n_rot, half:]
        qk = torch.cat((torch.addcmul(x1 * c, x2, s, value=-1), torch.addcmul(x2 * c, x1, s)), dim=-1)
        ctx.save_for_backward(cos, sin)
        ctx.half = half
        return qk, x[:, :, n_rot:].clone()

    @staticmethod
    def backward(ctx, g_qk: torch.Tensor, g_v: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [seq | batch, seq, 1, head_dim / 2]
        g1, g2 = g_qk[..., :ctx.half], g_qk[..., ctx.half:]
        g = torch.cat((torch.cat((torch.addcmul(g1 * c, g2, s), torch.addcmul(g2 * c, g1, s, value=-1)), dim=-1),
                       g_v), dim=2)
        return g.flatten(2), None, None, None, None


class RMSNormFunction(torch.autograd.Function):
    """weight * x / rms(x), computed in fp32 like transformers' LlamaRMSNorm, in 3 full-size
    passes forward and 6 back where autograd of the plain expression takes 5 and 12."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.in_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        g_weight = (gy * xhat).sum(dim=tuple(range(gy.dim() - 1))).to(weight.dtype)
        g_xhat = (gy * weight).to(xhat.dtype)
        dot = (g_xhat * xhat).sum(-1, keepdim=True).div_(-xhat.shape[-1])
        g_x = torch.addcmul(g_xhat, xhat, dot).mul_(rstd)
        return g_x.to(ctx.in_dtype), g_weight, None


def without_autocast(fn, *args):  # type: ignore[no-untyped-def]
    """Run a custom Function in the dtypes it chooses itself (autocast would recast inside it)."""
    device = args[0].device.type
    if not torch.is_autocast_enabled(device):
        return fn(*args)
    with torch.autocast(device, enabled=False):
        return fn(*args)


class Linear(nn.Linear):
    """nn.Linear left uninitialised: LlamaForCausalLM.init_weights draws every weight once. (Building
    on the meta device instead imports torch._dynamo, seconds of a resume's start.)"""

    def reset_parameters(self) -> None:
        return None


class Embedding(nn.Embedding):
    """nn.Embedding left uninitialised, like Linear."""

    def reset_parameters(self) -> None:
        return None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return without_autocast(RMSNormFunction.apply, x, self.weight, self.eps)


def fused_linear(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
    """One matmul for several projections of the same input (weights concatenated on the way)."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias)


class Attention(nn.Module):
    def __init__(self, c: Mapping[str, Any], head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], head_dim
        self.dropout = c["attention_dropout"]
        d, bias = c["hidden_size"], c["attention_bias"]
        self.q_proj = Linear(d, self.n_heads * head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv * head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv * head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        qkv = fused_linear(x, [self.q_proj, self.k_proj, self.v_proj])
        qk, v = without_autocast(RopeQKV.apply, qkv, cos.to(qkv.dtype), sin.to(qkv.dtype), h + kv, self.head_dim)
        q, k = (part.transpose(1, 2) for part in qk.split([h, kv], dim=2))
        v = v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None, scale=self.head_dim ** -0.5, enable_gqa=kv != h)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
        super().__init__()
        d, f, bias = c["hidden_size"], c["intermediate_size"], c["mlp_bias"]
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        if c["hidden_act"] not in ACTIVATIONS:
            raise UserError(f"hidden_act {c['hidden_act']!r} is not supported by the fast model; "
                            "train it with PACKTRAIN_MODEL_IMPL=hf")
        self.act = ACTIVATIONS[c["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, [self.gate_proj, self.up_proj]).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: Mapping[str, Any], head_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(c, head_dim)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """`model.*` of the HF names: embeddings, decoder layers, final norm."""

    def __init__(self, c: Mapping[str, Any], head_dim: int) -> None:
        super().__init__()
        self.embed_tokens = Embedding(c["vocab_size"], c["hidden_size"], c["pad_token_id"])
        self.layers = nn.ModuleList(DecoderLayer(c, head_dim) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


IGNORE = -100  # a target that does not count (transformers' ignore_index)


def loss_chunk(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: float, acc: torch.dtype, want_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed cross-entropy of one chunk of rows (IGNORE targets count nothing), with its share of the
    gradients of `scale` x the sum (hidden, head weight). Its [rows, vocab] buffer dies on return."""
    valid = (t != IGNORE)[:, None].to(acc)
    t = t.clamp(min=0)[:, None]
    logits = (h @ w.t()).to(acc)
    target_logit = logits.gather(1, t)
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()  # in place: one [rows, vocab] buffer for all of it
    total_exp = exp.sum(dim=-1, keepdim=True)
    loss = ((top + total_exp.log() - target_logit) * valid).sum()
    if not want_grad:
        return loss, None, None
    probs = exp.mul_(valid * scale / total_exp)  # softmax x scale, then minus scale at the target
    probs.scatter_add_(1, t, valid * -scale)
    probs = probs.to(w.dtype)
    return loss, probs @ w, probs.t() @ h


class LinearCrossEntropy(torch.autograd.Function):
    """`scale` x summed cross-entropy of `hidden @ weight.T` against targets (1 / rows: the mean),
    one chunk of rows at a time.

    Each chunk's logits are turned into its gradients (softmax - onehot) while still in cache, so
    backward is a scale of tensors kept from forward and no [tokens, vocab] tensor outlives its
    chunk. Matmuls run in `dtype` (bf16 under autocast), the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype, want_grad: bool, scale: float) -> torch.Tensor:
        n = hidden.shape[0]
        rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision: fp32, or fp64 in tests
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h: list[torch.Tensor] = []
        grad_w: torch.Tensor | None = None
        for start in range(0, n, rows):
            loss, g_h, g_w = loss_chunk(hidden[start:start + rows].to(dtype), w, targets[start:start + rows], scale,
                                        acc, want_grad)
            total += loss
            if g_h is not None and g_w is not None:
                grad_h.append(g_h.to(hidden.dtype))
                grad_w = g_w.to(acc) if grad_w is None else grad_w.add_(g_w)
        if grad_w is not None:
            ctx.save_for_backward(torch.cat(grad_h) if len(grad_h) > 1 else grad_h[0], grad_w.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         total: bool = False) -> torch.Tensor:
    """Mean over every target; `total`: the sum over targets other than IGNORE."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    flat = targets.reshape(-1)
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat, dtype, want_grad,
                                        1.0 if total else 1.0 / flat.numel())


class LlamaForCausalLM(nn.Module):
    """forward(input_ids) -> logits; forward(input_ids, targets=...) -> mean next-token loss, where
    targets are already aligned with input_ids (targets[:, i] is the token after input_ids[:, i]).
    `fields` is config.json (completed with LlamaConfig's defaults: `self.fields`)."""

    _no_split_modules = ("DecoderLayer",)  # transformers' name for the units FSDP shards one by one

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__()
        self.fields = c = complete(fields)
        head_dim = c["head_dim"]
        self.model = Body(c, head_dim)
        self.lm_head = Linear(c["hidden_size"], c["vocab_size"], bias=False)
        tied = c["tie_word_embeddings"]
        self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(c, head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) matrices and embeddings, zero biases, unit norms: the Llama
        init transformers uses, drawn from the global RNG in parameter order."""
        std = self.fields["initializer_range"]
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head or isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        if not self.fields["tie_word_embeddings"]:  # a tied head is the embedding, drawn above
            self.lm_head.weight.normal_(0.0, std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in backward (transformers 5's method name; always non-reentrant)."""
        self.gradient_checkpointing = True

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, d_model]. `position_ids` that restart at 0 mark
        packed examples: each attends only to itself (engine.token_flags), as transformers does."""
        t = input_ids.shape[1]
        if t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {t} tokens exceeds max_position_embeddings {self.rope_cos.shape[0]}")
        if position_ids is None:
            cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], None
        else:
            cos, sin, mask = self.rope_cos[position_ids], self.rope_sin[position_ids], packed_mask(position_ids)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, total: bool = False) -> torch.Tensor:
        """Logits, or with `targets` the mean loss (`total`: the sum over targets other than IGNORE)."""
        h = self.hidden_states(input_ids, position_ids)
        if targets is None:
            return self.lm_head(h)
        return linear_cross_entropy(h, self.lm_head.weight, targets, total=total)


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] bool: causal within each example, an example starting where positions restart."""
    block = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((block[:, :, None] == block[:, None, :]) & causal)[:, None]
