"""Every tokenizer kind round-trips ASCII and non-ASCII text through the files a cache keeps (and
every checkpoint copies), loaded as transformers loads them; byte-level kinds also know the bytes
each token stands for, which bits per byte count."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cache.build import build_cache
from engine.config import DataConfig
from engine.evaluate import byte_lengths
from engine.inference import load_tokenizer
from engine.paths import Layout
from tests.use_support import hf_tokenizer_folder

TEXTS = ("def f(x):\n    return x + 1\n", "héllo — ünïcode ✓ 日本語 😀 and Ωmega", "tabs\tand  two spaces ",
         "<|endoftext|> and </s> inside a document are text")


@pytest.mark.parametrize("kind", ["bytes", "bpe:300", "hf"])
def test_text_round_trips_and_byte_counts_are_exact(kind: str, root: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    spec = str(hf_tokenizer_folder(tmp_path / "hf", chat_template=False)) if kind == "hf" else kind
    data = DataConfig(source=str(tiny_corpus), dataset_name="rt", tokenizer=spec, seq_len=32, docs_per_chunk=20,
                      max_chunks=1)
    tokenizer = load_tokenizer(build_cache(data, Layout.resolve(root), workers=1) / "tokenizer")
    lengths = byte_lengths(tokenizer)
    assert (lengths is None) == (kind == "hf")  # SentencePiece-style pieces are not fixed byte runs
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids) == text
        if lengths is not None:
            assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
