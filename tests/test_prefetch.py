"""The row prefetcher hands out exactly the rows (and flags) asked for, whatever was prefetched."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.data import read_flags, read_sequences, seq_ids
from engine.prefetch import RowPrefetcher


class Chunks:
    """A ChunkSource of 3 chunks x 5 rows of 4 tokens; records which thread reads, can be told to fail."""

    flagged = True

    def __init__(self) -> None:
        self.chunk_sizes = {c: 5 for c in range(3)}
        self.threads: list[str] = []
        self.broken: set[int] = set()

    def read_chunk(self, chunk_id: int) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        if chunk_id in self.broken:
            raise OSError(f"chunk {chunk_id} is damaged")
        return np.arange(20, dtype=np.uint16).reshape(5, 4) + 100 * chunk_id

    def read_flags(self, chunk_id: int) -> np.ndarray:
        return (self.read_chunk(chunk_id) % 2).astype(np.uint8)


def direct(source: Chunks, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    return read_sequences(source, ids), read_flags(source, ids)


def assert_same(got: tuple[np.ndarray, np.ndarray | None], want: tuple[np.ndarray, np.ndarray | None]) -> None:
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def ids(*pairs: tuple[int, int]) -> np.ndarray:
    return np.concatenate([seq_ids(c, np.array([r])) for c, r in pairs])


@pytest.fixture
def source() -> Chunks:
    return Chunks()


def test_prefetched_rows_are_read_on_the_worker_and_equal_a_direct_read(source: Chunks) -> None:
    reader = RowPrefetcher(source)
    want = ids((2, 1), (0, 4), (2, 0))
    reader.start(want.copy())
    reader.settle()
    assert all(name.startswith("packtrain-rows") for name in source.threads)
    assert_same(reader.rows(want), direct(source, want))
    assert reader.read_s > 0
    reader.close()


def test_other_ids_than_the_prefetched_ones_are_read_on_the_spot(source: Chunks) -> None:
    """After growth the next step's ids differ from those read ahead: the rows follow the ids asked for."""
    reader = RowPrefetcher(source)
    reader.start(ids((0, 0), (0, 1)))
    asked = ids((0, 0), (1, 3))
    assert_same(reader.rows(asked), direct(source, asked))
    assert source.threads[-1] == threading.current_thread().name
    reader.close()


def test_a_failed_read_ahead_raises_only_when_its_rows_are_needed(source: Chunks) -> None:
    source.broken.add(1)
    reader = RowPrefetcher(source)
    reader.start(ids((1, 0)))
    reader.settle()  # a run that stops here never needed those rows
    assert_same(reader.rows(ids((0, 2))), direct(source, ids((0, 2))))
    reader.start(ids((1, 0)))
    with pytest.raises(OSError, match="chunk 1 is damaged"):
        reader.rows(ids((1, 0)))
    reader.close()
