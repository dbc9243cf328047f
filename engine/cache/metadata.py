"""cache_metadata.json: names, loading, shape checks and the manifest hash. Import-light (no numpy).

The metadata is the commit record of a cache: a chunk file exists for readers only once the
metadata lists it, and the metadata is only ever replaced atomically. Its layout:

    format, format_version, dataset_name, created, updated
    source      {spec, kind, subset, split, text_column, streaming, format, hash, n_docs}
    tokenizer   {spec, kind, sha256, dir}
    seq_len, row_len, dtype, vocab_size, eos_id, docs_per_chunk, planned_chunks
    codec ("lz4-frame"), hash_algo ("xxh3_64"), generation, manifest_hash
    chunks      [{id, file, n_seqs, tokens, dropped, docs: [start, end], raw_bytes,
                  compressed_bytes, hash, text_bytes, generation, doc_tokens: {min, max, hist},
                  trained, padding, truncated}]   (the last three in instruction caches only)
    builds      [{mode, started, seconds, chunks, tokens, workers, shard}]   (last few runs)

Version 2 added `source.format`: `text` (documents, as in version 1), or an instruction format
(`chat`, `prompt_response`, `instruction`) whose chunks carry a per-token flags plane after the
tokens (engine.token_flags), and whose records count the targets that train (`trained`), the
padding that keeps examples whole (`padding`) and the examples cut at the row length (`truncated`).
Version 1 caches read as `text`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_text
from engine.config import MAX_SEQ_LEN
from engine.errors import UserError

FORMAT = "packtrain.packed_cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TEXT_FORMAT = "text"
RECORD_FORMATS = (TEXT_FORMAT, "chat", "prompt_response", "instruction")
METADATA_FILE = "cache_metadata.json"
TOKENIZER_DIR = "tokenizer"
IDS_FILE = "ids.json"  # the tokenizer folder of a cache of token-id rows (engine.cache.rows): no tokenizer
STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
LOCK_FILE = "build.lock"
META_LOCK_FILE = "metadata.lock"
CODEC = "lz4-frame"
HASH_ALGO = "xxh3_64"
CHUNK_RE = re.compile(r"^packed_chunk_(\d{6,})\.lz4$")
MAX_BUILD_HISTORY = 20


def chunk_filename(chunk_id: int) -> str:
    return f"packed_chunk_{chunk_id:06d}.lz4"


def chunk_id_of(filename: str) -> int | None:
    m = CHUNK_RE.match(filename)
    return int(m.group(1)) if m else None


def dtype_name_for_vocab(vocab_size: int) -> str:
    """uint16 whenever the ids fit: half the disk of uint32, an eighth of int64."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise UserError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token ids")


def manifest_hash(chunks: Iterable[dict[str, Any]]) -> str:
    """Identity of a set of chunks: what a resume compares to know the past did not change."""
    h = hashlib.sha256()
    for c in sorted(chunks, key=lambda c: c["id"]):
        h.update(f"{c['id']}:{c['hash']}\n".encode())
    return h.hexdigest()


def record_format(meta: dict[str, Any]) -> str:
    """What the cache's documents are: `text`, or the instruction format its records were found in."""
    return str((meta.get("source") or {}).get("format", TEXT_FORMAT))


def has_flags(meta: dict[str, Any]) -> bool:
    """Whether chunk files carry the flags plane (loss mask and example starts) after the tokens."""
    return record_format(meta) != TEXT_FORMAT


def metadata_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / METADATA_FILE


def load_metadata(cache_dir: str | Path) -> dict[str, Any]:
    """Parse and sanity-check the metadata; any problem is one UserError line."""
    path = metadata_path(cache_dir)
    if not Path(cache_dir).is_dir():
        if Path(cache_dir).exists():
            raise UserError(f"cache {cache_dir} is a file, not a cache folder")
        raise UserError(f"cache {cache_dir} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{cache_dir} is not a packed cache (no {METADATA_FILE})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is corrupt ({e}); rebuild with `cache build --force-rebuild`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not packtrain cache metadata")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path} has format version {meta.get('format_version')}; "
                        f"this engine reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    problem = shape_problem(meta)
    if problem:
        raise UserError(f"{path} is incomplete or corrupt ({problem}); rebuild with `cache build --force-rebuild`")
    return meta


def _is_int(value: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


MAX_CHUNKS = 10_000_000  # ~40 TB of text at the smallest chunk size: anything above is a corrupt number
HEADER_INTS = {"seq_len": (2, MAX_SEQ_LEN), "vocab_size": (1, 1 << 32), "eos_id": (0, None), "generation": (0, None),
               "docs_per_chunk": (1, None)}
CHUNK_INTS = ("id", "n_seqs", "tokens", "raw_bytes", "compressed_bytes")


def shape_problem(meta: dict[str, Any]) -> str | None:
    """Why parsed metadata cannot be trusted, or None. Valid JSON of the wrong shape must be one
    error line, not a KeyError deep in a reader; and a chunk's `file` or the tokenizer `dir` naming
    anything but our own file names would let a crafted cache read or clean outside its folder."""
    for key, (low, high) in HEADER_INTS.items():
        if not _is_int(meta.get(key), low, high):
            return f"{key} is {meta.get(key)!r}" if key in meta else f"{key} is missing"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype is {meta.get('dtype')!r}"
    if meta["eos_id"] >= meta["vocab_size"]:
        return f"eos_id {meta['eos_id']} is outside the vocabulary of {meta['vocab_size']}"
    if meta.get("planned_chunks") is not None and not _is_int(meta["planned_chunks"], 0, MAX_CHUNKS):
        return f"planned_chunks is {meta['planned_chunks']!r}"
    for key, strings in (("source", ("spec",)), ("tokenizer", ("spec", "sha256"))):
        record = meta.get(key)
        if not isinstance(record, dict):
            return f"{key} is not a mapping" if key in meta else f"{key} is missing"
        for name in strings:
            if not isinstance(record.get(name), str):
                return f"{key} {name} is {record.get(name)!r}"
    if record_format(meta) not in RECORD_FORMATS or (meta.get("format_version") == 1 and has_flags(meta)):
        return f"source format is {record_format(meta)!r}"
    for name in ("subset", "split", "text_column"):
        if not isinstance(meta["source"].get(name, ""), (str, type(None))):
            return f"source {name} is {meta['source'][name]!r}"
    if meta["tokenizer"].get("dir", TOKENIZER_DIR) != TOKENIZER_DIR:
        return f"tokenizer dir is {meta['tokenizer']['dir']!r}, not {TOKENIZER_DIR!r}"
    builds = meta.get("builds", [])
    if not isinstance(builds, list) or not all(isinstance(b, dict) for b in builds):
        return "builds is not a list of records"
    chunks = meta.get("chunks")
    if not isinstance(chunks, list):
        return "chunks is missing" if "chunks" not in meta else "chunks is not a list"
    seen: set[int] = set()
    for i, c in enumerate(chunks):
        problem = _chunk_problem(c)
        if problem:
            return f"chunk record {i} {problem}"
        if c["id"] in seen:
            return f"chunk {c['id']} is listed twice"
        seen.add(c["id"])
    return None


def _chunk_problem(c: Any) -> str | None:
    if not isinstance(c, dict):
        return "is not a mapping"
    for key in CHUNK_INTS:
        if not _is_int(c.get(key), 0, MAX_CHUNKS if key == "id" else None):
            return f"has {key} {c.get(key)!r}"
    if c.get("file") != chunk_filename(c["id"]):
        return f"names file {c.get('file')!r}, not {chunk_filename(c['id'])!r}"
    if not isinstance(c.get("hash"), str):
        return "has no hash"
    docs = c.get("docs")
    if not (isinstance(docs, list) and len(docs) == 2 and all(_is_int(d) for d in docs) and docs[0] <= docs[1]):
        return f"has docs {docs!r}"
    for key in ("text_bytes", "trained", "padding", "truncated"):
        if key in c and not _is_int(c[key]):
            return f"has {key} {c[key]!r}"
    summary = c.get("doc_tokens", {})
    hist = summary.get("hist", []) if isinstance(summary, dict) else None
    if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 2 and all(_is_int(x) for x in h)
                                             for h in hist) \
            or not (summary.get("min") is summary.get("max") is None
                    or _is_int(summary.get("min")) and _is_int(summary.get("max"))):
        return "has a malformed doc_tokens summary"
    return None


def save_metadata(cache_dir: str | Path, meta: dict[str, Any]) -> None:
    """Recompute the derived fields and replace the file atomically (tmp, fsync, rename, fsync dir)."""
    meta["chunks"] = sorted(meta["chunks"], key=lambda c: c["id"])
    meta["manifest_hash"] = manifest_hash(meta["chunks"])
    meta["builds"] = meta.get("builds", [])[-MAX_BUILD_HISTORY:]
    atomic_write_text(metadata_path(cache_dir), dumps(meta))


def dumps(meta: dict[str, Any]) -> str:
    """Indented header, one compact line per chunk: readable, and encoded by json's C encoder
    (indent= falls back to pure Python, which made commits of large caches cost seconds)."""
    head = json.dumps({k: v for k, v in meta.items() if k != "chunks"}, indent=1, sort_keys=True)
    chunks = "".join(f"\n  {json.dumps(c, sort_keys=True, separators=(',', ':'))}," for c in meta["chunks"])
    return f'{head[:-2]},\n "chunks": [{chunks[:-1]}\n ]\n}}\n'


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The few facts lists and the TUI show about a cache."""
    chunks = meta["chunks"]
    return {
        "dataset_name": meta.get("dataset_name"),
        "seq_len": meta["seq_len"],
        "source": (meta.get("source") or {}).get("spec"),
        "tokenizer": (meta.get("tokenizer") or {}).get("spec"),
        "vocab_size": meta["vocab_size"],
        "dtype": meta["dtype"],
        **data_summary(meta),
        "chunks": len(chunks),
        "planned_chunks": meta.get("planned_chunks"),
        "sequences": sum(c["n_seqs"] for c in chunks),
        "tokens": sum(c["n_seqs"] for c in chunks) * (meta["seq_len"] + 1),
        "compressed_bytes": sum(c["compressed_bytes"] for c in chunks),
        "generation": meta["generation"],
        "manifest_hash": meta.get("manifest_hash"),
        "updated": meta.get("updated"),
    }


def data_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The record format, the examples (documents) and the share of targets that train: what the
    cache screen and `cache build/validate` report (None for text: every target trains)."""
    chunks = meta["chunks"]
    targets = sum(c["n_seqs"] for c in chunks) * meta["seq_len"]
    trained = sum(c.get("trained", 0) for c in chunks)
    return {"format": record_format(meta), "examples": sum(c["docs"][1] - c["docs"][0] for c in chunks),
            "trained_share": (trained / targets if targets else 0.0) if has_flags(meta) else None}
