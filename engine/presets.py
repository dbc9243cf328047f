"""Model size presets (LlamaConfig shapes) and their parameter counts, computed without torch.

The TUI shows parameter counts next to each preset and the name suggester needs them, so the count
is a closed formula here rather than a model instantiation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    tie_embeddings: bool
    use: str

    def llama_kwargs(self, vocab_size: int, seq_len: int) -> dict:
        """Keyword arguments for transformers.LlamaConfig."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "max_position_embeddings": max(seq_len, 128),
            "tie_word_embeddings": self.tie_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
        }

    def n_params(self, vocab_size: int) -> int:
        return llama_param_count(
            vocab_size, self.d_model, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn, self.tie_embeddings
        )

    def to_dict(self) -> dict:
        return asdict(self)


def llama_param_count(
    vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool
) -> int:
    head_dim = d // heads
    attn = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    per_layer = attn + 3 * d * ffn + 2 * d
    embeddings = vocab * d * (1 if tied else 2)
    return embeddings + layers * per_layer + d


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 2, 64, 4, 4, 176, True, "tests: trains in seconds"),
        Preset("5M", 4, 256, 4, 4, 688, True, "CPU demo"),
        Preset("25M", 6, 512, 8, 8, 1376, True, "small CPU / laptop GPU runs"),
        Preset("124M", 12, 768, 12, 12, 2048, True, "GPT-2-small class"),
        Preset("415M", 24, 1536, 12, 4, 2048, False, "24 layers, hidden 1536"),
        Preset("1B", 16, 2048, 32, 8, 8192, True, "Llama-3.2-1B shape"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
