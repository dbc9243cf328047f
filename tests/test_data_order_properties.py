"""Property: however a cache grows mid-epoch, and however often the run is restored from its saved
state, every training sequence is seen exactly once per epoch and held-out chunks never train."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data import DataOrder, split_ids

sizes = st.lists(st.integers(min_value=1, max_value=12), min_size=2, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    first=sizes,
    grown=st.lists(st.tuples(st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=12)),
                   max_size=4),
    batch=st.integers(min_value=1, max_value=7),
    eval_chunks=st.integers(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=2**31),
    restore_every=st.integers(min_value=1, max_value=5),
    window_rows=st.one_of(st.none(), st.integers(min_value=1, max_value=30)),
)
def test_each_sequence_once_per_epoch_across_growth_and_restores(first, grown, batch, eval_chunks, seed,
                                                                 restore_every, window_rows) -> None:
    cache = dict(enumerate(first))
    order = DataOrder.start(seed, cache, eval_chunks, window_rows)
    held = set(order.eval_chunks)
    growth = sorted(grown)  # (step at which it lands, chunk size): chunk ids continue the cache
    seen: set[tuple[int, int]] = set()
    epoch, cursor, step = 0, 0, 0
    while epoch == 0:
        while growth and growth[0][0] <= step:
            _, size = growth.pop(0)
            cache[max(cache) + 1] = size
            order.grow(epoch, cursor, cache, generation=step, n_before=0, n_after=0)
        if step % restore_every == 0:  # a kill and resume: only what trainer_state.json holds survives
            order = DataOrder.restore(order.state(), [e.to_dict() for e in order.events], cache)
        left_in_epoch = len(order.epoch_order(epoch)) - cursor
        ids, epoch, cursor = order.take(epoch, cursor, batch)
        in_epoch = ids[:left_in_epoch]
        chunks, rows = split_ids(in_epoch)
        for c, r in zip(chunks.tolist(), rows.tolist()):
            assert c not in held, "a held-out chunk was trained on"
            assert (c, r) not in seen, f"sequence {(c, r)} seen twice in epoch 0"
            seen.add((c, r))
        step += 1
    expected = {(c, r) for c in order.training_chunks() for r in range(cache[c])}
    assert seen == expected
