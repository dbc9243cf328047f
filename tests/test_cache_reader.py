"""PackedCache: the reader training uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.cache.build import build_cache
from engine.cache.reader import ChunkError, PackedCache
from engine.cache.validate import validate_cache
from engine.config import DataConfig
from engine.errors import UserError
from engine.paths import Layout


def test_rows_lru_and_manifest(tiny_cache: Path) -> None:
    cache = PackedCache(tiny_cache)
    chunk = cache.read_chunk(3)
    assert chunk.shape == (cache.chunk_sizes[3], 33) and not chunk.flags.writeable
    assert cache.read_chunk(3) is chunk
    np.testing.assert_array_equal(cache.rows(3, [2, 0]), chunk[[2, 0]])
    np.testing.assert_array_equal(cache.rows(3, np.array([1])), chunk[1:2])
    batch = cache.gather([3, 0, 3], [1, 2, 0])
    np.testing.assert_array_equal(batch, np.stack([chunk[1], cache.read_chunk(0)[2], chunk[0]]))
    assert batch.dtype == cache.dtype and batch.flags.writeable
    tight = PackedCache(tiny_cache, cache_bytes=0)
    first = tight.read_chunk(3)
    tight.read_chunk(4)
    assert tight.read_chunk(3) is not first and np.array_equal(tight.read_chunk(3), first)
    with pytest.raises(ChunkError, match="chunk 99 is not committed"):
        cache.read_chunk(99)
    with pytest.raises(ChunkError, match="chunk 99 is not committed"):
        cache.manifest_hash([0, 99])
    assert cache.manifest_hash([1, 0]) == cache.manifest_hash([0, 1]) != cache.manifest_hash([0])
    assert cache.manifest_hash() == cache.meta["manifest_hash"] == cache.manifest_hash(range(15))


def test_refresh_after_a_rebuild_never_serves_stale_rows(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    reader = PackedCache(tiny_cache)
    old = reader.read_chunk(0)
    data = DataConfig(source=str(tiny_corpus), dataset_name="tiny", tokenizer="bpe:300", seq_len=32, docs_per_chunk=4)
    build_cache(data, Layout.resolve(root), force_rebuild=True)
    reader.refresh()
    fresh = PackedCache(tiny_cache).read_chunk(0)
    assert reader.vocab_size > 257 and np.array_equal(reader.read_chunk(0), fresh)
    assert not (old.shape == fresh.shape and np.array_equal(old, fresh))


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        PackedCache(tmp_path / "nope")
    with pytest.raises(UserError, match="is not a packed cache"):
        PackedCache(tmp_path)


def test_replaced_tokenizer_is_a_cache_problem(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    tok = tiny_cache / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<|endoftext|>", "<|eot|>"))
    report = validate_cache(tiny_cache)
    assert not report.ok and "differs from the one the chunks were built with" in report.problems[0]
    data = DataConfig(source=str(tiny_corpus), dataset_name="tiny", tokenizer="bytes", seq_len=32, docs_per_chunk=4)
    with pytest.raises(UserError, match="differs from the one the chunks were built with"):
        build_cache(data, Layout.resolve(root))
    with pytest.raises(UserError, match="cannot repair"):
        validate_cache(tiny_cache, repair=True)
