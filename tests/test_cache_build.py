"""Building caches: round trips for every source and tokenizer kind, determinism, growth, filling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import corpus_texts, write_txt_corpus
from engine.cache.build import build_cache, derive_dataset_name, fill_cache
from engine.cache.metadata import chunk_filename
from engine.cache.reader import PackedCache
from engine.cache.validate import validate_cache
from engine.config import DataConfig
from engine.errors import UserError
from engine.paths import Layout


def build(root: Path, source: Path | str, name: str, tokenizer: str = "bytes", *, workers: int = 2,
          shard: tuple[int, int] | None = None, force_rebuild: bool = False, **data: object) -> PackedCache:
    data.setdefault("seq_len", 32)
    data.setdefault("docs_per_chunk", 4)
    config = DataConfig(source=str(source), dataset_name=name, tokenizer=tokenizer, **data)  # type: ignore[arg-type]
    return PackedCache(build_cache(config, Layout.resolve(root), workers=workers, shard=shard,
                                   force_rebuild=force_rebuild))


def chunk_bytes(cache: PackedCache) -> dict[str, bytes]:
    return {c["file"]: (cache.path / c["file"]).read_bytes() for c in cache.meta["chunks"]}


def assert_round_trip(cache: PackedCache, texts: list[str]) -> None:
    """Every chunk holds exactly its documents' tokens + EOS, cut into rows; they decode to the text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache.tokenizer_dir))
    assert tok.eos_token_id == cache.eos_id
    row = cache.seq_len + 1
    for c in cache.meta["chunks"]:
        start, end = c["docs"]
        docs = [tok.encode(t, add_special_tokens=False) + [cache.eos_id] for t in texts[start:end]]
        stream = [t for d in docs for t in d]
        arr = cache.read_chunk(c["id"])
        assert arr.dtype == np.dtype("<u2") and arr.shape == (len(stream) // row, row)
        assert arr.reshape(-1).tolist() == stream[: arr.size]
        assert c["dropped"] == len(stream) - arr.size < row
        flat = arr.reshape(-1)
        ends = np.flatnonzero(flat == cache.eos_id)
        pieces = np.split(flat[: ends[-1] + 1], ends[:-1] + 1) if ends.size else []
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == texts[start:start + len(pieces)]
    assert sum(c["docs"][1] - c["docs"][0] for c in cache.meta["chunks"]) == len(texts)


def test_txt_bytes_round_trip(tiny_cache: Path, tiny_corpus: Path) -> None:
    cache = PackedCache(tiny_cache)
    texts = [p.read_text(encoding="utf-8") for p in sorted(tiny_corpus.iterdir())]
    assert cache.vocab_size == 257 and cache.eos_id == 256 and cache.chunk_ids == list(range(15))
    assert cache.n_sequences == sum(cache.chunk_sizes.values()) > 0
    assert_round_trip(cache, texts)
    report = validate_cache(tiny_cache)
    assert report.ok and report.n_chunks == 15 and report.n_sequences == cache.n_sequences
    stats = json.loads((tiny_cache / "stats.json").read_text())
    assert stats["documents"] == 60 and stats["sequences"] == cache.n_sequences
    assert stats["doc_tokens"]["min"] == 0 and stats["doc_tokens"]["max"] >= stats["doc_tokens"]["p99"]
    assert "| document tokens |" in (tiny_cache / "report.md").read_text()


def test_jsonl_bpe_round_trip_and_determinism(tmp_path: Path) -> None:
    texts = corpus_texts(40, seed=1)
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    a = build(tmp_path / "a", src, "d", tokenizer="bpe:300", seq_len=16)
    b = build(tmp_path / "b", src, "d", tokenizer="bpe:300", seq_len=16)
    assert 258 < a.vocab_size <= 300 and a.meta["tokenizer"]["kind"] == "bpe"
    assert_round_trip(a, texts)
    assert a.tokenizer_sha256 == b.tokenizer_sha256
    assert a.manifest_hash() == b.manifest_hash() and chunk_bytes(a) == chunk_bytes(b)


def test_parquet_with_hf_tokenizer_folder_and_file_streaming(tmp_path: Path) -> None:
    texts = corpus_texts(30, seed=2)
    folder = write_txt_corpus(tmp_path / "txt", texts)
    trained = build(tmp_path / "r0", folder, "t", tokenizer="bpe:280")
    src = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), src)
    by_folder = build(tmp_path / "r1", src, "p", tokenizer=str(trained.tokenizer_dir), text_column="body")
    by_file = build(tmp_path / "r2", src, "p", tokenizer=str(trained.tokenizer_dir / "tokenizer.json"),
                    text_column="body", streaming=True)
    assert by_folder.meta["tokenizer"]["kind"] == by_file.meta["tokenizer"]["kind"] == "hf"
    assert by_folder.eos_id == trained.eos_id
    assert_round_trip(by_folder, texts)
    assert by_folder.manifest_hash() == by_file.manifest_hash() == trained.manifest_hash()
    assert by_file.meta["source"]["n_docs"] == 30 and by_file.meta["planned_chunks"] == 8


def test_growth_is_visible_to_an_open_reader(tmp_path: Path, tiny_corpus: Path) -> None:
    small = build(tmp_path, tiny_corpus, "g", max_chunks=3)
    assert small.chunk_ids == [0, 1, 2]
    before = small.manifest_hash()
    build(tmp_path, tiny_corpus, "g", max_docs=21)  # rounds up to 6 whole chunks
    old_n, new_n = small.refresh()
    assert old_n < new_n == small.n_sequences and small.chunk_ids == list(range(6))
    assert small.manifest_hash([0, 1, 2]) == before
    assert small.generation > 0 and small.read_chunk(5).shape[1] == 33
    full = build(tmp_path / "ref", tiny_corpus, "g")
    assert full.manifest_hash(range(6)) == small.manifest_hash()


def test_deleted_chunks_are_filled_byte_identically(tiny_cache: Path) -> None:
    cache = PackedCache(tiny_cache)
    original, manifest = chunk_bytes(cache), cache.manifest_hash()
    for k in (2, 9):
        (tiny_cache / chunk_filename(k)).unlink()
    assert fill_cache(tiny_cache, workers=2) == [2, 9]
    cache.refresh()
    assert chunk_bytes(cache) == original and cache.manifest_hash() == manifest
    assert fill_cache(tiny_cache) == []


def test_shards_then_fill_equal_a_full_build(tmp_path: Path, tiny_corpus: Path) -> None:
    even = build(tmp_path, tiny_corpus, "s", shard=(0, 2))
    assert even.chunk_ids == list(range(0, 15, 2))
    odd = build(tmp_path, tiny_corpus, "s", shard=(1, 2), workers=1)
    assert odd.chunk_ids == list(range(15))
    full = build(tmp_path / "ref", tiny_corpus, "s")
    assert odd.manifest_hash() == full.manifest_hash()


def test_force_rebuild_changes_tokenizer_and_generation(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    old = PackedCache(tiny_cache)
    with pytest.raises(UserError, match="was built with tokenizer 'bytes'"):
        build(root, tiny_corpus, "tiny", tokenizer="bpe:300")
    new = build(root, tiny_corpus, "tiny", tokenizer="bpe:300", force_rebuild=True)
    assert new.path == old.path and new.meta["tokenizer"]["kind"] == "bpe" and new.generation > old.generation
    assert new.manifest_hash() != old.manifest_hash() and validate_cache(tiny_cache).ok


def test_stdlib_source_and_default_chunking() -> None:
    from engine.cache.sources import open_source

    src = open_source(DataConfig(source="stdlib"))
    assert src.n_docs > 100 and all(p.endswith(".py") for p in src.paths)
    assert not any("site-packages" in p or "/test/" in p for p in src.paths)
    assert 16 <= src.n_docs / src.default_docs_per_chunk() <= 64  # "a few dozen chunks"


@pytest.mark.parametrize("source, subset, expected", [
    ("stdlib", None, "stdlib"),
    ("HuggingFaceFW/fineweb-edu", "sample-10BT", "fineweb-edu-sample-10BT"),
    ("roneneldan/TinyStories", None, "TinyStories"),
    ("./data/my stories.jsonl", None, "my-stories"),
    ("/tmp/corpus/*.txt", None, "corpus"),
])
def test_derive_dataset_name(source: str, subset: str | None, expected: str) -> None:
    assert derive_dataset_name(DataConfig(source=source, subset=subset)) == expected
