"""Per-token flags of instruction caches: which targets train and where each packed example starts.

An instruction cache stores, beside each row of seq_len + 1 tokens, one uint8 per token:

- TRAIN: the token is a target the loss counts (a response token, or the EOS that ends it). The row's
  targets are row[1:], so the loss mask is flags[:, 1:] & TRAIN.
- START: an example begins at this token. Inputs are row[:-1]; position ids restart at 0 on every
  START, and transformers turns restarting position ids into a block-diagonal causal mask (sdpa,
  eager and flex attention) or variable-length flash attention, so packed examples never attend
  to each other.

Plain text caches have no flags: every target trains and rows are one causal stream, as before.
numpy only, so the loop, the cache and every backend share these rules.
"""

from __future__ import annotations

import numpy as np

TRAIN = 1
START = 2


def loss_mask(flags: np.ndarray) -> np.ndarray:
    """[n, seq_len] bool: which targets (row[1:]) count in the loss."""
    return (flags[:, 1:] & TRAIN).astype(bool)


def trained_tokens(flags: np.ndarray) -> int:
    """Targets that count in the loss."""
    return int(np.count_nonzero(flags[:, 1:] & TRAIN))


def position_ids(flags: np.ndarray) -> np.ndarray:
    """[n, seq_len] int64 positions of the inputs (row[:-1]), restarting at 0 on every START."""
    starts = (flags[:, :-1] & START).astype(bool)
    starts[:, 0] = True  # a row always begins a block (a row never holds part of a cut example)
    index = np.broadcast_to(np.arange(starts.shape[1], dtype=np.int64), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start
