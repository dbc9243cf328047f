"""PackedCache: what training reads. Chunk-level random access, an LRU of decoded chunks, and refresh().

Readers take no lock: they only ever see chunks the metadata lists, and a chunk is listed only
after its file was written, fsynced and renamed into place, so a half-written chunk is invisible.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.cache.chunks import ChunkDamaged, np_dtype, read_chunk_file
from engine.cache.metadata import TOKENIZER_DIR, has_flags, load_metadata, manifest_hash, record_format
from engine.errors import UserError


DEFAULT_CACHE_BYTES = 256 << 20


class ChunkError(UserError):
    """A listed chunk that cannot be used; `cache validate --repair` fixes it."""


class PackedCache:
    def __init__(self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        """`cache_bytes` bounds the decoded chunks kept in memory (the most recent one always stays).
        Training sizes its shuffle window by the same budget, so a window's chunks all stay decoded."""
        self.path = Path(path).expanduser().resolve()
        self._lru: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self.cache_bytes = max(0, cache_bytes)
        self._lru_bytes = 0
        self._load(load_metadata(self.path))

    def _load(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.seq_len: int = int(meta["seq_len"])
        self.vocab_size: int = int(meta["vocab_size"])
        self.eos_id: int = int(meta["eos_id"])
        self.dtype: np.dtype = np_dtype(meta["dtype"])
        self.generation: int = int(meta["generation"])
        self.record_format: str = record_format(meta)
        self.flagged: bool = has_flags(meta)  # chunks carry loss-mask and example-start flags
        self._records: dict[int, dict[str, Any]] = {int(c["id"]): c for c in meta["chunks"]}
        self.chunk_ids: list[int] = sorted(self._records)
        self.chunk_sizes: dict[int, int] = {k: int(c["n_seqs"]) for k, c in self._records.items()}
        self.n_sequences: int = sum(self.chunk_sizes.values())
        tok = meta.get("tokenizer") or {}
        self.tokenizer_dir: Path = self.path / tok.get("dir", TOKENIZER_DIR)
        self.tokenizer_sha256: str = tok.get("sha256", "")

    @property
    def dataset_name(self) -> str:
        return str(self.meta.get("dataset_name") or self.path.name)

    def __len__(self) -> int:
        return self.n_sequences

    def __repr__(self) -> str:
        return (f"PackedCache({str(self.path)!r}, chunks={len(self.chunk_ids)}, sequences={self.n_sequences}, "
                f"seq_len={self.seq_len}, generation={self.generation})")

    def read_chunk(self, chunk_id: int) -> np.ndarray:
        """Decoded rows of one chunk (read-only). The hash is checked on every decode (once per chunk
        while it stays in the LRU); xxh3 costs a fraction of the LZ4 decode."""
        return self._decoded(chunk_id)[0]

    def read_flags(self, chunk_id: int) -> np.ndarray | None:
        """The chunk's per-token flags (engine.token_flags), or None in a text cache."""
        return self._decoded(chunk_id)[1]

    def _decoded(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        entry = self._lru.get(chunk_id)
        if entry is not None:
            self._lru.move_to_end(chunk_id)
            return entry
        record = self._records.get(chunk_id)
        if record is None:
            raise ChunkError(f"chunk {chunk_id} is not committed in cache {self.path}")
        try:
            entry = read_chunk_file(self.path, record, seq_len=self.seq_len, dtype=self.dtype,
                                    vocab_size=self.vocab_size, flagged=self.flagged)
        except ChunkDamaged as e:
            raise ChunkError(f"chunk {chunk_id} of cache {self.path} is damaged: {e}; "
                             f"run `packtrain-engine cache validate {self.path} --repair`") from None
        self._lru[chunk_id] = entry
        self._lru_bytes += _nbytes(entry)
        while self._lru_bytes > self.cache_bytes and len(self._lru) > 1:
            self._lru_bytes -= _nbytes(self._lru.popitem(last=False)[1])
        return entry

    def rows(self, chunk_id: int, rows: np.ndarray | list[int]) -> np.ndarray:
        return self.read_chunk(chunk_id)[np.asarray(rows, dtype=np.int64)]

    def gather(self, chunk_ids: Sequence[int], rows: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Row rows[i] of chunk chunk_ids[i] into out[i]: one training batch, [len(rows), seq_len+1]."""
        if out is None:
            out = np.empty((len(rows), self.seq_len + 1), dtype=self.dtype)
        lru = self._lru
        for i, (k, r) in enumerate(zip(chunk_ids, rows)):
            entry = lru.get(k)
            out[i] = (self.read_chunk(k) if entry is None else entry[0])[r]
        return out

    def refresh(self) -> tuple[int, int]:
        """Pick up chunks committed since opening; returns (old n_sequences, new n_sequences)."""
        old_n, old = self.n_sequences, self._records
        self._load(load_metadata(self.path))
        for k in list(self._lru):
            if k not in self._records or self._records[k]["hash"] != old[k]["hash"]:
                self._lru_bytes -= _nbytes(self._lru.pop(k))
        return old_n, self.n_sequences

    def manifest_hash(self, chunk_ids: Iterable[int] | None = None) -> str:
        """Hash over (id, raw hash) of the given chunks (all when None); an id that is not
        committed raises, so a resume cannot mistake a vanished chunk for an unchanged one."""
        if chunk_ids is None:
            return manifest_hash(self._records.values())
        records = []
        for k in set(int(k) for k in chunk_ids):
            if k not in self._records:
                raise ChunkError(f"chunk {k} is not committed in cache {self.path}")
            records.append(self._records[k])
        return manifest_hash(records)


def _nbytes(entry: tuple[np.ndarray, np.ndarray | None]) -> int:
    return entry[0].nbytes + (0 if entry[1] is None else entry[1].nbytes)
