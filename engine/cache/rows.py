"""A packed cache from rows that are already token ids: how the Python API trains on a map-style
Dataset (anything with __len__ and __getitem__ giving a 1-D sequence of ints, a torch tensor
included) with the same loop, checkpoints and exact resume as a cache built from text.

Each item is one training row of seq_len + 1 ids (the model reads row[:-1] and predicts row[1:]),
so every item has the same length. Rows are stored in order, a fixed number per chunk, in the
cache format `cache build` writes; the last chunks are held out for eval as usual. Given the
tokenizer the ids came from, the cache keeps its own copy exactly as `cache build` does, so models
trained on it generate, chat, evaluate text and export with it; without one, the cache's tokenizer
folder names the vocabulary only (`ids:<vocab_size>`) and its models have no tokenizer.

Writing is idempotent: the same dataset (and tokenizer) gives the same chunks, so a second call
finds its cache and writes nothing, and a different dataset or tokenizer under the same name is
refused rather than mixed in.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import atomic_write_text
from engine.cache.chunks import compress, doc_length_summary, np_dtype, write_chunk_file
from engine.cache.metadata import (CODEC, FORMAT, FORMAT_VERSION, HASH_ALGO, IDS_FILE, TOKENIZER_DIR,
                                   chunk_filename, dtype_name_for_vocab, load_metadata, metadata_path, save_metadata)
from engine.cache.registry import register_cache
from engine.cache.tokenizer import (PreparedTokenizer, TokenizerPlan, file_sha256, holds_tokenizer,
                                    prepare_rows_tokenizer, tokenizer_file, write_tokenizer)
from engine.errors import UserError
from engine.paths import Layout

MAX_ROWS_PER_CHUNK = 4096
MIN_CHUNKS = 8  # a small dataset still gets held-out chunks and a shuffle across chunks


def rows_of(dataset: Any, vocab_size: int) -> tuple[int, list[np.ndarray]]:
    """(row length, rows) with every row checked: 1-D, one length, ids in [0, vocab_size)."""
    try:
        n = len(dataset)
    except TypeError:
        raise UserError(f"a dataset must have a length (a map-style Dataset); got {type(dataset).__name__}") from None
    if n < 2:
        raise UserError(f"the dataset has {n} row(s); training needs at least 2 (one is held out for eval)")
    rows, length = [], None
    for i in range(n):
        row = np.asarray(dataset[i])
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise UserError(f"dataset item {i} is not a 1-D sequence of token ids (shape {row.shape}, {row.dtype})")
        length = len(row) if length is None else length
        if len(row) != length:
            raise UserError(f"dataset item {i} has {len(row)} ids, item 0 has {length}: rows must be one length")
        if length < 3:
            raise UserError(f"dataset rows hold {length} ids; a row is seq_len + 1 ids, at least 3")
        outside = row[(row < 0) | (row >= vocab_size)]
        if outside.size:
            raise UserError(f"dataset item {i} holds id {int(outside[0])}, outside the vocabulary of {vocab_size:,}")
        rows.append(row)
    return int(length or 0), rows


def write_rows_cache(dataset: Any, layout: Layout, name: str, *, vocab_size: int | None = None,
                     eos_id: int | None = None, tokenizer: Any = None) -> Path:
    """The cache at cache/packed_sequences/<seq_len>/<name> holding `dataset`'s rows. `tokenizer`:
    the one the ids came from (engine.cache.tokenizer.prepare_rows_tokenizer says what it may be);
    `vocab_size` then defaults to its vocabulary and `eos_id` to its end-of-text token."""
    if vocab_size is None and tokenizer is None:
        raise UserError("training from a dataset needs vocab_size= or tokenizer= (token ids are below its vocabulary)")
    prepared = None
    if tokenizer is not None:
        prepared = prepare_rows_tokenizer(tokenizer, eos_id)
        vocab_size, eos_id = prepared.vocab_size if vocab_size is None else vocab_size, prepared.eos_id
        if prepared.vocab_size > vocab_size:
            raise UserError(f"tokenizer {prepared.plan.spec!r} has {prepared.vocab_size:,} tokens, more than the "
                            f"vocab_size of {vocab_size:,}")
    assert vocab_size is not None
    eos_id = 0 if eos_id is None else eos_id
    if not 0 <= eos_id < vocab_size:
        raise UserError(f"eos_id {eos_id} is outside the vocabulary of {vocab_size:,}")
    row_len, rows = rows_of(dataset, prepared.vocab_size if prepared else vocab_size)
    seq_len = row_len - 1
    path = layout.cache_dir(seq_len, name)
    if prepared is not None and not isinstance(tokenizer, (str, Path)):
        # an object has no spec: the cache's own copy stands for it, a folder that --tokenizer takes
        prepared = replace(prepared, plan=TokenizerPlan(str(path / TOKENIZER_DIR), "hf"))
    dtype_name = dtype_name_for_vocab(vocab_size)
    per_chunk = min(MAX_ROWS_PER_CHUNK, math.ceil(len(rows) / MIN_CHUNKS))
    chunks = [np.stack(rows[i:i + per_chunk]).astype(np_dtype(dtype_name)) for i in range(0, len(rows), per_chunk)]
    records, frames = [], []
    for k, block in enumerate(chunks):
        data, raw_hash, raw_bytes = compress(block)
        frames.append(data)
        records.append({"id": k, "file": chunk_filename(k), "n_seqs": len(block), "tokens": int(block.size),
                        "dropped": 0, "docs": [k * per_chunk, k * per_chunk + len(block)], "raw_bytes": raw_bytes,
                        "compressed_bytes": len(data), "hash": raw_hash, "generation": 0,
                        "doc_tokens": doc_length_summary(np.full(len(block), row_len))})
    if metadata_path(path).is_file():
        meta = load_metadata(path)
        if [(c["id"], c["hash"]) for c in meta["chunks"]] != [(c["id"], c["hash"]) for c in records] \
                or (meta["vocab_size"], meta["eos_id"]) != (vocab_size, eos_id):
            raise UserError(f"cache {path} holds other rows, another vocabulary or another eos_id than this dataset; "
                            "give the dataset another dataset_name")
        if not _same_tokenizer(path, meta, prepared):
            spec = (meta.get("tokenizer") or {}).get("spec", "")
            held = "no tokenizer" if spec.startswith("ids:") else f"tokenizer {spec!r}"
            raise UserError(f"cache {path} holds this dataset with {held}, not with the tokenizer given; "
                            "give the dataset another dataset_name")
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_record = _write_tokenizer(path, prepared, vocab_size, eos_id)
    for record, data in zip(records, frames):
        write_chunk_file(path, record["id"], data)
    now = time.time()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset_name": name, "created": now, "updated": now,
        "source": {"spec": f"python:{type(dataset).__name__}", "kind": "rows", "n_docs": len(rows)},
        "tokenizer": tokenizer_record,
        "seq_len": seq_len, "row_len": row_len, "dtype": dtype_name, "vocab_size": vocab_size, "eos_id": eos_id,
        "docs_per_chunk": per_chunk, "planned_chunks": len(records), "codec": CODEC, "hash_algo": HASH_ALGO,
        "generation": 0, "chunks": records, "builds": [],
    }
    save_metadata(path, meta)
    register_cache(layout, path, meta)
    return path


def _same_tokenizer(path: Path, meta: dict[str, Any], prepared: PreparedTokenizer | None) -> bool:
    """Whether the cache at `path` was written with this tokenizer (or, like this call, with none)."""
    saved_ids = (meta.get("tokenizer") or {}).get("kind") == "ids"
    if prepared is None or saved_ids:
        return prepared is None and saved_ids
    return holds_tokenizer(tokenizer_file(path, meta), prepared.tokenizer)


def _write_tokenizer(path: Path, prepared: PreparedTokenizer | None, vocab_size: int, eos_id: int) -> dict[str, Any]:
    """The cache's tokenizer folder and its metadata record: the tokenizer as `cache build` writes
    it, or without one a file naming the vocabulary (`ids:<vocab_size>`)."""
    if prepared is not None:
        return {"spec": prepared.plan.spec, "kind": prepared.plan.kind, "sha256": write_tokenizer(path, prepared),
                "dir": TOKENIZER_DIR, "eos_token": prepared.eos_token}
    folder = path / TOKENIZER_DIR
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / IDS_FILE, json.dumps({"kind": "ids", "vocab_size": vocab_size, "eos_id": eos_id}))
    return {"spec": f"ids:{vocab_size}", "kind": "ids", "sha256": file_sha256(folder / IDS_FILE), "dir": TOKENIZER_DIR}
