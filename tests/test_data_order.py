"""Data order: a pure function of (seed, epoch, growth events); growth never repeats or skips rows."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from engine.data import DataOrder, from_ranges, rank_slice, read_sequences, rows_in_budget, split_ids, to_ranges
from engine.errors import UserError

SIZES = {c: 5 + (c * 7) % 11 for c in range(20)}  # uneven chunk sizes, like real packed chunks


def consumed_until_end_of_epoch(order: DataOrder, gb: int, grow_at: int | None = None,
                                more: dict[int, int] | None = None) -> tuple[list[int], int]:
    """Step through epoch 0 with global batch `gb`, optionally growing after `grow_at` steps."""
    seen: list[int] = []
    epoch, cursor, step = 0, 0, 0
    while epoch == 0:
        if step == grow_at and more is not None:
            order.grow(epoch, cursor, {**order.chunk_sizes, **more}, 2, 0, 0)
        n = min(gb, len(order.epoch_order(0)) - cursor)
        ids, epoch, cursor = order.take(epoch, cursor, n)
        seen.extend(int(i) for i in ids)
        step += 1
    return seen, step


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = DataOrder.start(1, SIZES, eval_chunks=2)
    b = DataOrder.start(1, dict(reversed(list(SIZES.items()))), eval_chunks=2)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), DataOrder.start(2, SIZES, eval_chunks=2).epoch_order(0))


def test_epoch_is_a_permutation_of_training_rows_without_held_out_chunks() -> None:
    order = DataOrder.start(3, SIZES, eval_chunks=2)
    assert order.eval_chunks == [18, 19]
    ids = order.epoch_order(0)
    expected = {(c << 32) | r for c in range(18) for r in range(SIZES[c])}
    assert len(ids) == len(expected) == order.n_train_sequences
    assert set(ids.tolist()) == expected


def windows_of(order: np.ndarray, sizes: dict[int, int]) -> list[set[int]]:
    """The order's windows: a window closes once every row of the chunks it has touched was seen."""
    chunks, _ = split_ids(order)
    out: list[set[int]] = []
    members: set[int] = set()
    left = 0
    for c in chunks.tolist():
        if c not in members:
            members.add(c)
            left += sizes[c]
        left -= 1
        if left == 0:
            out.append(members)
            members = set()
    assert not members, "the order ended inside a window"
    return out


def test_windows_hold_whole_chunks_up_to_the_row_budget() -> None:
    order = DataOrder.start(0, SIZES, eval_chunks=0, window_rows=40)
    windows = windows_of(order.epoch_order(0), SIZES)
    rows = [sum(SIZES[c] for c in w) for w in windows]
    assert all(r <= 40 for r in rows) and sum(rows) == sum(SIZES.values())
    assert all(a + b > 40 for a, b in zip(rows, rows[1:])), "a window closed before the budget was full"
    assert len(windows) > 3  # the budget, not the cache, bounded them


def test_a_cache_that_fits_the_budget_is_one_window() -> None:
    order = DataOrder.start(0, SIZES, eval_chunks=0, window_rows=sum(SIZES.values()))
    assert len(windows_of(order.epoch_order(0), SIZES)) == 1
    assert order.state()["window_rows"] == sum(SIZES.values()) and "window" not in order.state()


def test_rows_in_budget_counts_decoded_bytes() -> None:
    assert rows_in_budget(1024 << 20, 256, np.uint16) == (1024 << 20) // (257 * 2)
    assert rows_in_budget(1 << 20, 1023, np.uint32) == 256
    assert rows_in_budget(10, 256, np.uint16) == 1  # never an empty window
    assert rows_in_budget(3 << 20, 1023, np.uint16, flagged=True) == 1024  # instruction rows carry a flag byte a token


# A run saved before windows were sized in rows: its state says "window": 8 (chunks). These digests
# of its epoch orders were recorded with that code, so an old checkpoint resumes bit-exactly.
LEGACY_STATE = {"seed": 4, "window": 8, "train_chunks": [[0, 9]], "eval_chunks": [9]}
LEGACY_EVENTS = [{"epoch": 0, "at_cursor": 18, "generation": 3, "n_before": 50, "n_after": 100, "chunks": [[10, 20]]}]
LEGACY_DIGESTS = {0: "b54d0132593c4733", 1: "251543db9e86ce2c"}


def test_a_state_without_window_rows_keeps_its_old_order_of_eight_chunk_windows() -> None:
    order = DataOrder.restore(LEGACY_STATE, LEGACY_EVENTS, SIZES)
    for epoch, digest in LEGACY_DIGESTS.items():
        assert hashlib.sha256(order.epoch_order(epoch).tobytes()).hexdigest()[:16] == digest
    assert order.state() == LEGACY_STATE  # saved again, it stays an old-style run
    windows = windows_of(order.epoch_order(1), SIZES)
    assert [len(w) for w in windows] == [8, 8, 3]


@pytest.mark.parametrize("data", [{"window_rows": 0}, {"window_rows": "all"}, {"window_rows": True},
                                  {"window_rows": 2.5}, {"window": -1}])
def test_restore_refuses_a_bad_window(data: dict) -> None:
    state = {**DataOrder.start(1, SIZES, eval_chunks=1).state(), **data}
    with pytest.raises(UserError, match="trainer_state.json data.window"):
        DataOrder.restore(state, [], SIZES)


def chi_square_of_first(order: DataOrder, n: int, chunks: list[int]) -> float:
    """Pearson's statistic of the first n sequences' chunk histogram against uniform over `chunks`
    (all the same size), so about len(chunks) - 1 when uniform."""
    first, _ = split_ids(order.epoch_order(0)[:n])
    counts = np.bincount(first, minlength=max(chunks) + 1)[chunks]
    assert counts.sum() == n, "a sequence came from outside the expected chunks"
    expected = n / len(chunks)
    return float(((counts - expected) ** 2 / expected).sum())


MANY = {c: 50 for c in range(400)}  # 20,000 rows in 400 equal chunks
BOUND = 399 + 6 * math.sqrt(2 * 399)  # chi-square with 399 dof: mean 399, sd 28


@pytest.mark.parametrize("seed", range(5))
def test_early_sequences_are_a_uniform_sample_of_the_epoch(seed: int) -> None:
    order = DataOrder.start(seed, MANY, eval_chunks=0, window_rows=rows_in_budget(16 << 20, 255, np.uint16))
    assert chi_square_of_first(order, 2000, list(MANY)) < BOUND
    old = DataOrder.restore({**order.state(), "window_rows": None, "window": 8}, [], MANY)
    assert chi_square_of_first(old, 2000, list(MANY)) > 10 * BOUND  # what the 8-chunk windows did


def test_a_cache_over_the_budget_mixes_every_chunk_the_budget_holds() -> None:
    order = DataOrder.start(3, MANY, eval_chunks=0, window_rows=5000)  # 100 chunks per window
    first_window = sorted(windows_of(order.epoch_order(0), MANY)[0])
    assert len(first_window) == 100
    assert chi_square_of_first(order, 1000, first_window) < 99 + 6 * math.sqrt(2 * 99)


def test_take_crosses_epochs_as_one_stream() -> None:
    order = DataOrder.start(5, SIZES, eval_chunks=0)
    n = len(order.epoch_order(0))
    ids, epoch, cursor = order.take(0, n - 3, 10)
    assert (epoch, cursor) == (1, 7)
    assert np.array_equal(ids, np.concatenate([order.epoch_order(0)[-3:], order.epoch_order(1)[:7]]))
    _, epoch, cursor = order.take(0, n - 3, 3)
    assert (epoch, cursor) == (1, 0)


@pytest.mark.parametrize("grow_at", [0, 1, 4, 9])
def test_growth_mid_epoch_never_repeats_or_skips(grow_at: int) -> None:
    half = {c: n for c, n in SIZES.items() if c < 10}
    more = {c: n for c, n in SIZES.items() if c >= 10}
    order = DataOrder.start(11, half, eval_chunks=1)
    before = order.epoch_order(0).copy()
    seen, _ = consumed_until_end_of_epoch(order, gb=6, grow_at=grow_at, more=more)
    assert len(seen) == len(set(seen))
    expected = {(c << 32) | r for c in SIZES if c != 9 for r in range(SIZES[c])}
    assert set(seen) == expected  # held-out chunk 9 stays held out; all new rows are trained on
    assert seen[: grow_at * 6] == before[: grow_at * 6].tolist()  # the consumed prefix is unchanged
    assert order.eval_chunks == [9]


def test_growth_replays_identically_from_saved_state() -> None:
    half = {c: n for c, n in SIZES.items() if c < 10}
    order = DataOrder.start(4, half, eval_chunks=1)
    order.grow(0, 18, SIZES, 3, 50, 100)
    saved_state, saved_events = order.state(), [e.to_dict() for e in order.events]
    again = DataOrder.restore(saved_state, saved_events, SIZES)
    for epoch in (0, 1, 2):
        assert np.array_equal(order.epoch_order(epoch), again.epoch_order(epoch))
    # the next epoch starts from the grown set
    assert len(again.epoch_order(1)) == order.n_train_sequences


def test_growth_with_nothing_new_records_nothing() -> None:
    order = DataOrder.start(4, SIZES, eval_chunks=1)
    assert order.grow(0, 10, SIZES, 2, 1, 1) is None and order.events == []


def test_gap_filled_in_the_middle_moves_nothing_already_placed() -> None:
    with_gap = {c: n for c, n in SIZES.items() if c != 4}
    order = DataOrder.start(8, with_gap, eval_chunks=1)
    first = order.epoch_order(0)[:20].copy()
    order.grow(0, 20, SIZES, 2, 0, 0)  # chunk 4 arrives later
    assert np.array_equal(order.epoch_order(0)[:20], first)
    assert 4 in order.training_chunks()


def test_restore_refuses_when_a_used_chunk_is_missing() -> None:
    order = DataOrder.start(1, SIZES, eval_chunks=1)
    sizes = {c: n for c, n in SIZES.items() if c != 3}
    with pytest.raises(UserError, match="missing"):
        DataOrder.restore(order.state(), [], sizes)


def test_too_few_chunks_for_held_out_eval() -> None:
    with pytest.raises(UserError, match="held out"):
        DataOrder.start(1, {0: 5}, eval_chunks=1)


def test_rank_slices_partition_the_global_batch() -> None:
    ids = np.arange(12)
    parts = [rank_slice(ids, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), ids)


def test_ranges_roundtrip() -> None:
    ids = [0, 1, 2, 5, 7, 8, 100]
    assert to_ranges(ids) == [[0, 3], [5, 6], [7, 9], [100, 101]]
    assert from_ranges(to_ranges(ids)) == ids


def test_eval_ids_are_fixed_and_from_held_out_chunks() -> None:
    order = DataOrder.start(1, SIZES, eval_chunks=2)
    ids = order.eval_ids(20)
    chunks, rows = split_ids(ids)
    assert set(chunks.tolist()) <= {18, 19} and len(ids) == min(20, SIZES[18] + SIZES[19])
    assert np.array_equal(ids, order.eval_ids(20))


class ArraySource:
    """Chunks as in-memory arrays whose tokens encode (chunk, row), to check reads by id."""

    def __init__(self, sizes: dict[int, int], width: int = 4) -> None:
        self.chunk_sizes = sizes
        self.width = width

    def read_chunk(self, c: int) -> np.ndarray:
        rows = np.arange(self.chunk_sizes[c])
        return np.stack([np.full(self.width, c * 1000 + r, dtype=np.uint16) for r in rows])


def test_read_sequences_returns_rows_by_id_in_order() -> None:
    src = ArraySource(SIZES)
    order = DataOrder.start(2, SIZES, eval_chunks=0)
    ids = order.epoch_order(0)
    for start in range(0, len(ids), 8):
        batch = ids[start:start + 8]
        got = read_sequences(src, batch)
        chunks, rows = split_ids(batch)
        assert got.dtype == np.int64 and got.shape == (len(batch), 4)
        assert np.array_equal(got[:, 0], chunks * 1000 + rows)


@pytest.mark.parametrize("share", [1.0, 0.3])
def test_reading_an_epoch_decodes_each_chunk_about_once_per_window(tiny_cache, monkeypatch: pytest.MonkeyPatch,
                                                                   share: float) -> None:
    """The reader's LRU and the window share one budget, so the shuffled order costs no re-decodes."""
    from engine.cache import reader

    decoded: list[int] = []
    real = reader.read_chunk_file
    monkeypatch.setattr(reader, "read_chunk_file", lambda path, record, **kw: (decoded.append(record["id"]),
                                                                                real(path, record, **kw))[1])
    probe = reader.PackedCache(tiny_cache)
    budget = int(share * sum(probe.read_chunk(c).nbytes for c in probe.chunk_ids))
    cache = reader.PackedCache(tiny_cache, cache_bytes=budget)
    order = DataOrder.start(2, cache.chunk_sizes, eval_chunks=0,
                            window_rows=rows_in_budget(cache.cache_bytes, cache.seq_len, cache.dtype))
    windows = windows_of(order.epoch_order(0), cache.chunk_sizes)
    assert (len(windows) == 1) == (share == 1.0)
    decoded.clear()
    ids = order.epoch_order(0)
    for start in range(0, len(ids), 8):
        read_sequences(cache, ids[start:start + 8])
    assert sorted(set(decoded)) == cache.chunk_ids
    assert len(decoded) == len(cache.chunk_ids), "a chunk was decoded twice in one epoch"
