"""Data order: a pure function of (seed, epoch, growth events); growth never repeats or skips rows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import DataOrder, from_ranges, rank_slice, read_sequences, split_ids, to_ranges
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


def test_rows_are_shuffled_within_windows_of_chunks() -> None:
    order = DataOrder.start(0, SIZES, eval_chunks=0)
    chunks, _ = split_ids(order.epoch_order(0))
    # walk the order in windows: each window's rows come from at most `window` chunks
    pos, distinct_in_windows = 0, []
    while pos < len(chunks):
        members = set()
        while pos < len(chunks) and (len(members) < order.window or chunks[pos] in members):
            members.add(int(chunks[pos]))
            pos += 1
        distinct_in_windows.append(len(members))
    assert len(distinct_in_windows) == -(-len(SIZES) // order.window)


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
