"""The next step's rows (and their token flags), read on a worker thread while the current step runs.

The loop asks for rows by sequence ids; a prefetch of the ids it expects next is started just before
a step and awaited just after it, so the cache is never touched by two threads at once (evaluation,
growth checks and saves run between steps, with the worker idle). Rows are handed out only when the
ids asked for are exactly the ids prefetched: when growth or anything else changed the order, the
rows are read again on the spot. What trains is therefore the same with or without the worker; the
order and its cursor (engine.data) are never consulted here.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from engine.data import read_flags, read_sequences

Batch = tuple[np.ndarray, np.ndarray | None]  # rows, and their per-token flags (None for a text cache)


class RowPrefetcher:
    """Counts what reading costs the loop: `wait_s`, seconds the loop spent blocked on rows (reads
    on the spot, or a prefetch that was not done); `read_s`, the worker's own reading time, which
    runs beside the step."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packtrain-rows")
        self.pending: tuple[np.ndarray, Future[Batch]] | None = None
        self.wait_s = 0.0
        self.read_s = 0.0

    def _batch(self, ids: np.ndarray) -> Batch:
        return read_sequences(self.cache, ids), read_flags(self.cache, ids)

    def _read(self, ids: np.ndarray) -> Batch:
        started = time.perf_counter()
        batch = self._batch(ids)
        self.read_s += time.perf_counter() - started
        return batch

    def rows(self, ids: np.ndarray) -> Batch:
        """The rows and flags of `ids`: the prefetched ones when they are these ids, else read now."""
        started = time.perf_counter()
        pending, self.pending = self.pending, None
        if pending is not None and np.array_equal(pending[0], ids):
            batch = pending[1].result()
        else:
            if pending is not None:
                wait([pending[1]])  # the worker is idle before this thread reads
            batch = self._batch(ids)
        self.wait_s += time.perf_counter() - started
        return batch

    def start(self, ids: np.ndarray) -> None:
        """Begin reading `ids` on the worker."""
        self.pending = (ids, self.pool.submit(self._read, ids))

    def settle(self) -> None:
        """Wait until the worker is idle, so this thread may touch the cache. A failed read raises
        only when its rows are asked for: a run that stops first never needed them."""
        if self.pending is not None:
            started = time.perf_counter()
            wait([self.pending[1]])
            self.wait_s += time.perf_counter() - started

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
