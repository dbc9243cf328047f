"""Which sequences each optimizer step trains on: an order that survives kills, resumes and growth.

The order of an epoch is a pure function of (seed, epoch, recorded growth events, window): permute
the chunk ids, cut that sequence into windows of chunks whose decoded rows fit a memory budget,
then shuffle the rows of each window together. A cache that fits the budget is one window, so at
every step the rows trained so far are a uniform sample of the epoch; a larger one mixes as many
chunks as the budget holds. Chunks hold consecutive documents of a source that is often sorted
(by file name), so a window of a few chunks fed whole early steps from one topical slice: measured,
that cost 3% of val loss at step 200. Reads stay cheap because the reader keeps the decoded chunks
of a window in an LRU bounded by the same budget: each chunk is decoded about once per window.
There is no iterator or worker RNG state to save: the position is one integer, the cursor,
counting the sequences consumed by completed optimizer steps in the current epoch, global across
ranks.

Sequences are identified by (chunk id, row) packed into one int64, never by a prefix sum over
sorted chunk ids, so filling a gap in the middle of a cache moves nothing that was already placed.

Growth: at a step boundary, chunks that appeared since the run started are recorded as an event
{epoch, at_cursor, ...}; the rest of that epoch becomes order[:at_cursor] + shuffle(order[at_cursor:]
∪ new rows). The consumed prefix never changes, so nothing is seen twice or skipped, and later
epochs simply start with the grown chunk set.

Held-out evaluation uses the last `eval_chunks` chunks present when the run started, recorded by
id and excluded from training for the life of the run, however the cache grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from engine.errors import UserError

SHIFT = 32  # seq id = chunk_id << 32 | row
WINDOW = 8  # chunks per window in runs recorded before windows were sized in rows (no window_rows)


class ChunkSource(Protocol):
    """The part of engine.cache.reader.PackedCache that ordering and reading need."""

    chunk_sizes: Mapping[int, int]
    flagged: bool

    def read_chunk(self, chunk_id: int) -> np.ndarray: ...

    def read_flags(self, chunk_id: int) -> np.ndarray | None: ...


def seq_ids(chunk: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(chunk) << SHIFT) | rows.astype(np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> SHIFT, ids & ((1 << SHIFT) - 1)


def to_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Sorted ids as [[start, stop), ...]: chunk sets stay small in JSON even for huge caches."""
    out: list[list[int]] = []
    for i in sorted(set(int(i) for i in ids)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> list[int]:
    return [i for start, stop in ranges for i in range(int(start), int(stop))]


def check_ranges(value: Any, what: str) -> list[list[int]]:
    """Chunk-id ranges read from a checkpoint: [[start, stop), ...] with 0 <= start < stop."""
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1] for r in value):
        raise UserError(f"checkpoint field {what!r} must hold [start, stop) chunk-id ranges")
    return value


def rows_in_budget(budget_bytes: int, seq_len: int, dtype: Any, flagged: bool = False) -> int:
    """Decoded rows of `seq_len + 1` tokens (and their flag bytes when `flagged`) that fit
    `budget_bytes`: the window of a new run."""
    return max(1, int(budget_bytes) // ((int(seq_len) + 1) * (np.dtype(dtype).itemsize + int(flagged))))


def cut_windows(costs: list[int], limit: int) -> list[slice]:
    """Consecutive runs of items whose costs add up to at most `limit` (an item over it stands alone)."""
    out, start, total = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and total + cost > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += cost
    out.append(slice(start, len(costs)))
    return out


def windowed_shuffle(rng: np.random.Generator, groups: list[tuple[int, np.ndarray]], limit: int,
                     cost: Callable[[int], int]) -> np.ndarray:
    """Permute the groups (chunks with their rows), cut them into windows of at most `limit` total
    `cost(chunk)`, then shuffle rows within each window."""
    if not groups:
        return np.empty(0, dtype=np.int64)
    perm = rng.permutation(len(groups))
    parts = []
    for window in cut_windows([cost(groups[i][0]) for i in perm], limit):
        ids = np.concatenate([seq_ids(groups[i][0], groups[i][1]) for i in perm[window]])
        parts.append(ids[rng.permutation(len(ids))])
    return np.concatenate(parts)


@dataclass
class GrowthEvent:
    """Chunks added to the run at (epoch, at_cursor); `chunks` holds their id ranges."""

    epoch: int
    at_cursor: int
    generation: int
    n_before: int
    n_after: int
    chunks: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "GrowthEvent":
        """A recorded event from a checkpoint, refused (UserError) unless it has exactly these fields,
        counts >= 0 and well-formed chunk ranges."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping) or sorted(data) != sorted(names) \
                or not all(type(data[k]) is int and data[k] >= 0 for k in names if k != "chunks"):
            raise UserError(f"checkpoint field 'growth_events' holds {str(data)[:60]!r}, not "
                            f"{{{', '.join(names)}}} with counts >= 0")
        return cls(**{k: data[k] for k in names if k != "chunks"}, chunks=check_ranges(data["chunks"], "growth_events"))


@dataclass
class DataOrder:
    """The run's chunk sets, growth history and shuffle window; everything else is derived from them."""

    seed: int
    chunk_sizes: dict[int, int]  # every chunk the run may read: training and held-out
    train_chunks: list[int]  # training chunks when the run started
    eval_chunks: list[int]
    events: list[GrowthEvent] = field(default_factory=list)
    # Rows shuffled together: a window holds whole chunks whose rows add up to at most this many.
    # None only for runs recorded before it, which keep their windows of `window` chunks.
    window_rows: int | None = None
    window: int = WINDOW
    _memo: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def start(cls, seed: int, chunk_sizes: Mapping[int, int], eval_chunks: int,
              window_rows: int | None = None) -> "DataOrder":
        """A new run's order; `window_rows` None shuffles the whole cache as it is now in one window."""
        ids = sorted(int(c) for c in chunk_sizes)
        if len(ids) <= eval_chunks:
            raise UserError(
                f"the cache has {len(ids)} chunk(s) but {eval_chunks} are held out for evaluation: "
                "build more of the cache or lower data.eval_chunks"
            )
        held = ids[len(ids) - eval_chunks:] if eval_chunks else []
        train = ids[: len(ids) - eval_chunks]
        sizes = {c: int(chunk_sizes[c]) for c in ids}
        if sum(sizes[c] for c in train) == 0:
            raise UserError("the cache holds no training sequences")
        rows = sum(sizes.values()) if window_rows is None else int(window_rows)
        return cls(seed=seed, chunk_sizes=sizes, train_chunks=train, eval_chunks=held, window_rows=max(1, rows))

    # --- persistence (trainer_state.json) -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        window = {"window": self.window} if self.window_rows is None else {"window_rows": self.window_rows}
        return {"seed": self.seed, **window, "train_chunks": to_ranges(self.train_chunks),
                "eval_chunks": list(self.eval_chunks)}

    @classmethod
    def restore(cls, state: Mapping[str, Any], events: list[dict], chunk_sizes: Mapping[int, int]) -> "DataOrder":
        """The order a checkpoint recorded; a state of the wrong shape is refused with UserError."""
        if not isinstance(state, Mapping) or type(state.get("seed")) is not int:
            raise UserError("checkpoint field 'data' must hold an integer seed")
        evs = [GrowthEvent.from_dict(e) for e in events]
        eval_ids = state.get("eval_chunks")
        if not isinstance(eval_ids, list) or not all(type(c) is int and c >= 0 for c in eval_ids):
            raise UserError("checkpoint field 'data.eval_chunks' must be a list of chunk ids")
        ranges = [check_ranges(state.get("train_chunks"), "data.train_chunks"), *(e.chunks for e in evs)]
        named = sum(stop - start for r in ranges for start, stop in r)
        if named > len(chunk_sizes):  # checked before the ranges are expanded into ids
            raise UserError(f"the checkpoint's data order names {named:,} chunks but the cache holds "
                            f"{len(chunk_sizes):,}: chunks this run used are missing from the cache")
        train = from_ranges(ranges[0])
        known = set(train) | set(eval_ids) | {c for r in ranges[1:] for c in from_ranges(r)}
        missing = sorted(c for c in known if c not in chunk_sizes)
        if missing:
            raise UserError(
                f"{len(missing)} chunk(s) this run already used are missing from the cache (first: {missing[0]}); "
                "repair it with `packtrain-engine cache validate PATH --repair`"
            )
        rows = state.get("window_rows")
        return cls(
            seed=int(state["seed"]), chunk_sizes={c: int(chunk_sizes[c]) for c in known}, train_chunks=train,
            eval_chunks=[int(c) for c in state["eval_chunks"]], events=evs,
            window_rows=None if rows is None else _positive(rows, "window_rows"),
            window=_positive(state.get("window", WINDOW), "window"),
        )

    # --- chunk sets ---------------------------------------------------------------------------
    @property
    def known_chunks(self) -> list[int]:
        return sorted(self.chunk_sizes)

    def training_chunks(self) -> list[int]:
        """Training chunks now: those at the start plus every recorded growth."""
        ids = set(self.train_chunks)
        for e in self.events:
            ids.update(from_ranges(e.chunks))
        return sorted(ids)

    @property
    def n_train_sequences(self) -> int:
        return sum(self.chunk_sizes[c] for c in self.training_chunks())

    # --- order ---------------------------------------------------------------------------------
    def _rng(self, epoch: int, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % (1 << 32), epoch, k])

    def epoch_order(self, epoch: int) -> np.ndarray:
        key = (epoch, len(self.events))
        if key not in self._memo:
            self._memo.clear()
            base = set(self.train_chunks)
            for e in self.events:
                if e.epoch < epoch:
                    base.update(from_ranges(e.chunks))
            order = self._shuffle(self._rng(epoch, 0), self._groups(sorted(base)))
            for k, e in enumerate((e for e in self.events if e.epoch == epoch), start=1):
                order = self._regrow(order, e, k, epoch)
            self._memo[key] = order
        return self._memo[key]

    def _groups(self, chunks: Iterable[int]) -> list[tuple[int, np.ndarray]]:
        return [(c, np.arange(self.chunk_sizes[c], dtype=np.int64)) for c in chunks]

    def _regrow(self, order: np.ndarray, e: GrowthEvent, k: int, epoch: int) -> np.ndarray:
        rest = np.sort(order[e.at_cursor:])
        chunks, rows = split_ids(rest)
        uniq, starts = np.unique(chunks, return_index=True)
        bounds = list(starts[1:]) + [len(rest)]
        groups = [(int(c), rows[s:b]) for c, s, b in zip(uniq, starts, bounds)]
        groups += self._groups(from_ranges(e.chunks))
        groups.sort(key=lambda g: g[0])
        return np.concatenate([order[: e.at_cursor], self._shuffle(self._rng(epoch, k), groups)])

    def _shuffle(self, rng: np.random.Generator, groups: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """A window costs what the reader keeps decoded: every row of its chunks, even of a chunk
        partly consumed before a growth; old runs count chunks instead."""
        if self.window_rows is None:
            return windowed_shuffle(rng, groups, self.window, lambda c: 1)
        return windowed_shuffle(rng, groups, self.window_rows, self.chunk_sizes.__getitem__)

    def take(self, epoch: int, cursor: int, count: int) -> tuple[np.ndarray, int, int]:
        """The next `count` sequence ids from (epoch, cursor), running on into the next epoch,
        and the position after them (never left at the very end of an epoch)."""
        parts = []
        while count > 0:
            order = self.epoch_order(epoch)
            k = min(count, len(order) - cursor)
            parts.append(order[cursor:cursor + k])
            cursor += k
            count -= k
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
        return np.concatenate(parts), epoch, cursor

    def grow(self, epoch: int, cursor: int, chunk_sizes: Mapping[int, int], generation: int,
             n_before: int, n_after: int) -> GrowthEvent | None:
        """Record chunks of `chunk_sizes` this run does not know yet; None when nothing is new."""
        new = sorted(int(c) for c in chunk_sizes if int(c) not in self.chunk_sizes)
        if not new:
            return None
        for c in new:
            self.chunk_sizes[c] = int(chunk_sizes[c])
        event = GrowthEvent(epoch=epoch, at_cursor=cursor, generation=generation, n_before=n_before,
                            n_after=n_after, chunks=to_ranges(new))
        self.events.append(event)
        return event

    def eval_ids(self, count: int) -> np.ndarray:
        """The first `count` held-out sequences, in chunk order: the same set at every eval."""
        parts, left = [], count
        for c in self.eval_chunks:
            n = min(left, self.chunk_sizes[c])
            parts.append(seq_ids(c, np.arange(n)))
            left -= n
            if left == 0:
                break
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"trainer_state.json data.{key} must be a positive integer, got {value!r}: "
                        "the checkpoint is damaged or from another program")
    return value


def rank_slice(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank r's contiguous share of a global batch; the union over ranks is the whole batch."""
    per = len(ids) // world_size
    return ids[rank * per:(rank + 1) * per]


def read_sequences(source: ChunkSource, ids: np.ndarray) -> np.ndarray:
    """Rows [len(ids), seq_len + 1] as int64, in the order of `ids`; the source's chunk LRU, bounded
    by the same budget as the shuffle window, decodes each chunk about once per window."""
    return _gather(source.read_chunk, ids, np.int64)


def read_flags(source: ChunkSource, ids: np.ndarray) -> np.ndarray | None:
    """The rows' per-token flags (engine.token_flags) in the order of `ids`; None for a text cache."""
    return _gather(source.read_flags, ids, np.uint8) if source.flagged else None


def _gather(read: Callable[[int], Any], ids: np.ndarray, dtype: Any) -> np.ndarray:
    chunks, rows = split_ids(ids)
    uniq, first = np.unique(chunks, return_index=True)
    # touched in the order the rows come: a batch that spans two windows marks the old window's
    # chunks least recently used, so the LRU evicts those rather than the new window's
    parts = {int(c): read(int(c)) for c in uniq[np.argsort(first)]}
    out = np.empty((len(ids), next(iter(parts.values())).shape[1]), dtype=dtype)
    for c, arr in parts.items():
        sel = chunks == c
        out[sel] = arr[rows[sel]]
    return out


def check_resume_cache(saved: Mapping[str, Any], cache: Any, consumed_hash: str) -> None:
    """Refuse to resume onto a cache whose past differs from what the run trained on.

    Growth is fine; a different tokenizer, sequence length or dtype, or any changed chunk the run
    already knew about, is not: the weights would silently continue on other data.
    """
    where = saved.get("path", "the cache")
    if saved.get("sequence_length") != cache.seq_len:
        raise UserError(f"cache {where} now has seq_len {cache.seq_len}, the run used {saved.get('sequence_length')}")
    if saved.get("tokenizer_sha256") != cache.tokenizer_sha256:
        raise UserError(f"cache {where} has a different tokenizer than the one this run was trained with")
    if saved.get("dtype") is not None and str(saved["dtype"]) != str(cache.dtype):
        raise UserError(f"cache {where} now stores {cache.dtype} tokens, the run used {saved['dtype']}")
    if saved.get("consumed_manifest_hash") != consumed_hash:
        raise UserError(
            f"the cache changed under this run: chunks it already used in {where} differ from when the "
            "checkpoint was saved; refusing to resume on different data"
        )
