"""Tiny pretrained models saved to a folder the way the hub holds them (config.json, model.safetensors,
tokenizer files), so fine-tuning tests need no download: a random Llama and a random GPT-2."""

from __future__ import annotations

from pathlib import Path

# Wide enough init that the frozen output layer can express a peaked distribution, so an adapter
# alone can lower the loss within a few steps (at 0.02 every logit stays near uniform).
INIT_RANGE = 0.3
TEXT = "the cat sat on a mat and dog ran far away from home while birds sang in tall green trees"


def save_tiny_pretrained(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-wide model of `arch` (llama or gpt2) with a 300-token byte-level BPE, context 64."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = tok.get_vocab_size()
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=0, initializer_range=INIT_RANGE))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, initializer_range=INIT_RANGE))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder
