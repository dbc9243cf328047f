"""One chunk = one LZ4 frame around a raw little-endian [n_seqs, seq_len + 1] uint16/uint32 array,
followed in instruction caches by a [n_seqs, seq_len + 1] uint8 flags plane (engine.token_flags).

Packing is a pure function of the chunk's documents: each document is followed by EOS, the
stream is cut into rows of seq_len + 1 tokens and the remainder under one row is dropped (and
counted), never carried into the next chunk. That is what lets any chunk be rebuilt alone,
byte for byte. Instruction examples are packed whole instead (`pack_examples`): each goes into
the first row of its chunk with room for it (first fit, in source order), and what no example
fills is padding (EOS, no flags), so a response never loses its prompt to a row boundary. numpy + lz4 + xxhash only: the reader
imports this, not the tokenizer stack.
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
from engine.token_flags import START, TRAIN

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
    flags: np.ndarray | None = None  # [n_seqs, seq_len + 1] uint8 (instruction caches)
    padding: int = 0  # pad tokens that keep examples whole
    truncated: int = 0  # examples longer than a row, cut to it

    def record_fields(self) -> dict[str, Any]:
        """What an instruction chunk's metadata record adds: trained targets, padding, truncations."""
        if self.flags is None:
            return {}
        trained = int(np.count_nonzero(self.flags[:, 1:] & TRAIN))
        return {"trained": trained, "padding": self.padding, "truncated": self.truncated}


def pack(doc_ids: list[list[int]], *, eos_id: int, seq_len: int, dtype: np.dtype) -> Packed:
    lengths = np.fromiter((len(ids) for ids in doc_ids), dtype=np.int64, count=len(doc_ids))
    total = int(lengths.sum()) + len(doc_ids)
    eos = (eos_id,)
    stream = chain.from_iterable(chain.from_iterable((ids, eos) for ids in doc_ids))
    flat = np.fromiter(stream, dtype=dtype, count=total)
    row = seq_len + 1
    n_rows = total // row
    return Packed(flat[: n_rows * row].reshape(n_rows, row), total, total - n_rows * row, lengths)


@dataclass
class Example:
    """One tokenized instruction example: its ids and which of them are trained targets."""

    ids: list[int]
    trains: list[bool]


def pack_examples(examples: list[Example], *, eos_id: int, seq_len: int, dtype: np.dtype) -> Packed:
    """Whole examples, each followed by EOS (trained when its last token is), first-fit into rows of
    seq_len + 1: each goes into the first row with room for it, else starts a new row. A row's
    unused tail is EOS padding that never trains. An example longer than a row is cut to one row
    (counted in `truncated` and `dropped`)."""
    row = seq_len + 1
    rows, flag_rows = np.full((len(examples), row), eos_id, dtype=dtype), np.zeros((len(examples), row), dtype=np.uint8)
    fill = np.zeros(len(examples), dtype=np.int64)  # tokens used per row; at most one row per example
    n_rows = tokens = dropped = truncated = 0
    for ex in examples:
        ids = np.asarray([*ex.ids, eos_id], dtype=dtype)
        flags = np.asarray([*ex.trains, bool(ex.trains) and ex.trains[-1]], dtype=np.uint8) * np.uint8(TRAIN)
        flags[0] |= START
        tokens += len(ids)
        if len(ids) > row:
            dropped += len(ids) - row
            truncated += 1
            ids, flags = ids[:row], flags[:row]
        fits = np.flatnonzero(fill[:n_rows] + len(ids) <= row)
        r = int(fits[0]) if fits.size else n_rows
        n_rows = max(n_rows, r + 1)
        rows[r, fill[r]:fill[r] + len(ids)] = ids
        flag_rows[r, fill[r]:fill[r] + len(ids)] = flags
        fill[r] += len(ids)
    lengths = np.fromiter((len(ex.ids) for ex in examples), dtype=np.int64, count=len(examples))
    padding = int(n_rows * row - fill[:n_rows].sum())
    return Packed(rows[:n_rows], tokens, dropped, lengths, flag_rows[:n_rows], padding, truncated)


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


def compress(rows: np.ndarray, flags: np.ndarray | None = None) -> tuple[bytes, str, int]:
    """(LZ4 frame, hash of the raw bytes, raw size); the frame also carries its own checksum. The
    flags plane follows the tokens, so the hash (and the manifest) covers the loss mask too."""
    raw = np.ascontiguousarray(rows).tobytes()
    if flags is not None:
        raw += np.ascontiguousarray(flags, dtype=np.uint8).tobytes()
    return lz4.frame.compress(raw, store_size=True, content_checksum=True), raw_hash(raw), len(raw)


def write_chunk_file(cache_dir: Path, chunk_id: int, data: bytes) -> Path:
    """tmp -> fsync -> rename. The directory fsync comes with the metadata commit that lists it."""
    target = cache_dir / chunk_filename(chunk_id)
    atomic_write_bytes(target, data, sync_dir=False)
    return target


def decode(data: bytes, record: dict[str, Any], *, seq_len: int, dtype: np.dtype, vocab_size: int,
           flagged: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Compressed bytes -> read-only [n_seqs, seq_len + 1] tokens (and flags when `flagged`), or
    ChunkDamaged with the reason. Token ids are checked against the vocabulary too: a chunk (and
    record) copied from a cache with a bigger tokenizer hashes fine but would crash the model's
    embedding lookup."""
    if len(data) != record["compressed_bytes"]:
        raise ChunkDamaged(f"size {len(data):,} bytes, expected {record['compressed_bytes']:,} (truncated or replaced)")
    try:
        raw = lz4.frame.decompress(data)
    except RuntimeError as e:
        raise ChunkDamaged(f"not a valid LZ4 frame ({e})") from None
    shape = (record["n_seqs"], seq_len + 1)
    token_bytes = shape[0] * shape[1] * dtype.itemsize
    row_bytes = shape[1] * (dtype.itemsize + (1 if flagged else 0))
    if len(raw) != record["raw_bytes"] or len(raw) != shape[0] * row_bytes:
        raise ChunkDamaged(f"holds {len(raw):,} raw bytes, expected {record['n_seqs']} rows of {row_bytes} bytes")
    if raw_hash(raw) != record["hash"]:
        raise ChunkDamaged("content hash mismatch")
    arr = np.frombuffer(raw, dtype=dtype, count=shape[0] * shape[1]).reshape(shape)
    top = int(arr.max()) if arr.size else 0
    if top >= vocab_size:
        raise ChunkDamaged(f"token id {top:,} >= vocabulary size {vocab_size:,} (from another tokenizer?)")
    if not flagged:
        return arr, None
    flags = np.frombuffer(raw, dtype=np.uint8, offset=token_bytes).reshape(shape)
    if flags.size and int(flags.max()) > (TRAIN | START):
        raise ChunkDamaged(f"flag byte {int(flags.max())} is not a combination of train and start")
    return arr, flags


def read_chunk_file(cache_dir: Path, record: dict[str, Any], *, seq_len: int, dtype: np.dtype,
                    vocab_size: int, flagged: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        data = (cache_dir / record["file"]).read_bytes()
    except FileNotFoundError:
        raise ChunkDamaged("file is missing") from None
    except OSError as e:
        raise ChunkDamaged(f"cannot be read ({e.strerror or e})") from None
    return decode(data, record, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size, flagged=flagged)
