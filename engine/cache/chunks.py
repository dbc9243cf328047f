"""One chunk = one LZ4 frame around a raw little-endian [n_seqs, seq_len + 1] uint16/uint32 array.

Packing is a pure function of the chunk's documents: each document is followed by EOS, the
stream is cut into rows of seq_len + 1 tokens and the remainder under one row is dropped (and
counted), never carried into the next chunk. That is what lets any chunk be rebuilt alone,
byte for byte. numpy + lz4 + xxhash only: the reader imports this, not the tokenizer stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import lz4.frame
import numpy as np
import xxhash

from engine.atomic import atomic_write_bytes
from engine.cache.metadata import chunk_filename

HIST_BITS = 6  # doc-length histogram keeps the top 6 bits: exact below 64 tokens, within 3% above


class ChunkDamaged(Exception):
    """A chunk file that does not match its metadata record; the message says how."""


def np_dtype(name: str) -> np.dtype:
    return np.dtype(name).newbyteorder("<")


def raw_hash(raw: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(raw)


@dataclass
class Packed:
    rows: np.ndarray  # [n_seqs, seq_len + 1]
    tokens: int  # tokens including one EOS per document, before dropping the remainder
    dropped: int
    doc_lengths: np.ndarray  # tokens per document, without its EOS


def pack(doc_ids: list[list[int]], *, eos_id: int, seq_len: int, dtype: np.dtype) -> Packed:
    lengths = np.fromiter((len(ids) for ids in doc_ids), dtype=np.int64, count=len(doc_ids))
    total = int(lengths.sum()) + len(doc_ids)
    eos = (eos_id,)
    stream = chain.from_iterable(chain.from_iterable((ids, eos) for ids in doc_ids))
    flat = np.fromiter(stream, dtype=dtype, count=total)
    row = seq_len + 1
    n_rows = total // row
    return Packed(flat[: n_rows * row].reshape(n_rows, row), total, total - n_rows * row, lengths)


def doc_length_summary(lengths: np.ndarray) -> dict[str, Any]:
    """min, max and a mergeable histogram; percentiles over many chunks come from merged counts."""
    if lengths.size == 0:
        return {"min": None, "max": None, "hist": []}
    lengths = lengths.astype(np.int64)
    bitlen = np.zeros_like(lengths)
    nz = lengths > 0
    bitlen[nz] = np.floor(np.log2(lengths[nz])).astype(np.int64) + 1
    shift = np.maximum(0, bitlen - HIST_BITS)
    keys, counts = np.unique((lengths >> shift) << shift, return_counts=True)
    return {"min": int(lengths.min()), "max": int(lengths.max()),
            "hist": [[int(k), int(c)] for k, c in zip(keys, counts)]}


def compress(rows: np.ndarray) -> tuple[bytes, str, int]:
    """(LZ4 frame, hash of the raw bytes, raw size); the frame also carries its own checksum."""
    raw = np.ascontiguousarray(rows).tobytes()
    return lz4.frame.compress(raw, store_size=True, content_checksum=True), raw_hash(raw), len(raw)


def write_chunk_file(cache_dir: Path, chunk_id: int, data: bytes) -> Path:
    """tmp -> fsync -> rename. The directory fsync comes with the metadata commit that lists it."""
    target = cache_dir / chunk_filename(chunk_id)
    atomic_write_bytes(target, data, sync_dir=False)
    return target


def decode(data: bytes, record: dict[str, Any], *, seq_len: int, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    """Compressed bytes -> read-only [n_seqs, seq_len + 1] array, or ChunkDamaged with the reason.
    Token ids are checked against the vocabulary too: a chunk (and record) copied from a cache with
    a bigger tokenizer hashes fine but would crash the model's embedding lookup."""
    if len(data) != record["compressed_bytes"]:
        raise ChunkDamaged(f"size {len(data):,} bytes, expected {record['compressed_bytes']:,} (truncated or replaced)")
    try:
        raw = lz4.frame.decompress(data)
    except RuntimeError as e:
        raise ChunkDamaged(f"not a valid LZ4 frame ({e})") from None
    row_bytes = (seq_len + 1) * dtype.itemsize
    if len(raw) != record["raw_bytes"] or len(raw) != record["n_seqs"] * row_bytes:
        raise ChunkDamaged(f"holds {len(raw):,} raw bytes, expected {record['n_seqs']} rows of {row_bytes} bytes")
    if raw_hash(raw) != record["hash"]:
        raise ChunkDamaged("content hash mismatch")
    arr = np.frombuffer(raw, dtype=dtype).reshape(record["n_seqs"], seq_len + 1)
    top = int(arr.max()) if arr.size else 0
    if top >= vocab_size:
        raise ChunkDamaged(f"token id {top:,} >= vocabulary size {vocab_size:,} (from another tokenizer?)")
    return arr


def read_chunk_file(cache_dir: Path, record: dict[str, Any], *, seq_len: int, dtype: np.dtype,
                    vocab_size: int) -> np.ndarray:
    try:
        data = (cache_dir / record["file"]).read_bytes()
    except FileNotFoundError:
        raise ChunkDamaged("file is missing") from None
    except OSError as e:
        raise ChunkDamaged(f"cannot be read ({e.strerror or e})") from None
    return decode(data, record, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size)
