"""Which tokens an eval reads: the run's held-out chunks, another packed cache, or any source.

- Held-out (the default) rebuilds the run's DataOrder from the checkpoint and takes the sequences
  the trainer's own eval takes (eval_batches x micro_batch of the run, from the first held-out
  chunk on), so an eval of a checkpoint saved at an eval step reproduces the loss the run logged.
- A cache must hold ids of the checkpoint's tokenizer: ids of another one would be scored as
  nonsense, so it is refused. Its first sequences, in chunk order, are read.
- A source is tokenized here with the checkpoint's own tokenizer and packed as a cache build packs it
  (documents joined with EOS, rows of seq_len + 1), in memory: nothing is written. The same text
  gives checkpoints with different tokenizers comparable bits per byte.

Rows of an instruction cache come with their flags (engine.token_flags): the eval then scores the
response tokens only, with each packed example on its own, as the trainer's eval does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from engine.cache.reader import PackedCache
from engine.cache.tokenizer import TOKENIZER_FILE, check_cache_tokenizer, same_tokenizer
from engine.config import DataConfig, TrainConfig
from engine.errors import UserError
from engine.inference import LoadedModel
from engine.paths import Layout

SOURCE_DOCS_PER_ENCODE = 64


@dataclass
class EvalData:
    rows: np.ndarray  # [n, seq_len + 1] token ids
    kind: Literal["held-out", "cache", "source"]
    label: str  # what a person reads in a table or an event
    spec: str  # the cache folder or source spec it came from
    tokenizer: Path  # tokenizer.json the ids belong to
    flags: np.ndarray | None = None  # per-token flags of instruction-cache rows


def plan(loaded: LoadedModel, layout: Layout, batches: int | None) -> tuple[int, int]:
    """(sequences, batch size): batches of the run's micro-batch, the run's eval_batches by default, so
    the default eval reads what the trainer's eval read."""
    cfg = loaded.run_config(layout)
    train = cfg.train if cfg is not None else TrainConfig()
    return (batches or train.eval_batches) * train.micro_batch, train.micro_batch


def select(loaded: LoadedModel, layout: Layout, count: int, *, cache: str | None = None,
           source: str | None = None) -> EvalData:
    """`count` sequences (fewer when the data holds fewer) of the chosen data."""
    if cache and source:
        raise UserError("give --cache or --source, not both")
    if source:
        from engine.cache.metadata import METADATA_FILE

        if (Path(source).expanduser() / METADATA_FILE).is_file():
            return from_cache(loaded, layout, source, count)
        return from_source(loaded, source, count)
    if cache:
        return from_cache(loaded, layout, cache, count)
    return held_out(loaded, layout, count)


def for_model(data: EvalData, loaded: LoadedModel, layout: Layout) -> EvalData:
    """The same data for another checkpoint: the same ids when it shares the tokenizer, the same
    text tokenized its own way for a source; refused for cache ids of another tokenizer."""
    if data.kind == "source" and not same_tokenizer(data.tokenizer, loaded.tokenizer_file):
        return from_source(loaded, data.spec, len(data.rows))
    if not same_tokenizer(data.tokenizer, loaded.tokenizer_file):
        raise UserError(f"{loaded.display_name} uses another tokenizer than the {data.kind} data ({data.label}); "
                        "compare them on the same text with --source SPEC")
    if data.rows.shape[1] - 1 > loaded.context:
        raise UserError(f"{data.label} has sequences of {data.rows.shape[1] - 1} tokens; {loaded.display_name} "
                        f"was trained on {loaded.context}")
    return data


def held_out(loaded: LoadedModel, layout: Layout, count: int) -> EvalData:
    from engine.cache.metadata import METADATA_FILE
    from engine.cache.naming import cache_path_for
    from engine.data import DataOrder, check_resume_cache, read_flags, read_sequences

    state = loaded.state
    record = state.get("cache") if isinstance(state.get("cache"), dict) else {}
    cfg = loaded.run_config(layout)
    candidates = [cache_path_for(cfg.data, layout)] if cfg is not None else []  # where it is under this root
    if isinstance(record.get("path"), str):
        candidates.append(Path(record["path"]))  # where it was when the run trained
    path = next((p for p in candidates if (p / METADATA_FILE).is_file()), None)
    if path is None:
        where = f" ({candidates[-1]})" if candidates else ""
        raise UserError(f"the cache {loaded.display_name} was trained on is gone{where}; "
                        "evaluate with --cache PATH or --source SPEC")
    cache = PackedCache(path)
    _check_tokenizer(loaded, cache)
    try:
        order = DataOrder.restore(state["data"], state.get("growth_events", []), cache.chunk_sizes)
        check_resume_cache(record, cache, cache.manifest_hash(order.known_chunks))
    except UserError as e:
        raise UserError(f"cannot evaluate {loaded.display_name} on its held-out chunks: {e}") from None
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{loaded.display_name} records no data order to find its held-out chunks in; "
                        "evaluate with --cache PATH or --source SPEC") from None
    ids = order.eval_ids(count)
    if len(ids) == 0:
        raise UserError(f"the run of {loaded.display_name} held out no chunks (data.eval_chunks 0); "
                        "evaluate with --cache PATH or --source SPEC")
    chunks = ", ".join(str(c) for c in order.eval_chunks)
    return EvalData(rows=read_sequences(cache, ids), kind="held-out", spec=str(cache.path), tokenizer=_tok(cache),
                    label=f"held-out chunk(s) {chunks} of {cache.dataset_name}, {len(ids):,} sequences",
                    flags=read_flags(cache, ids))


def from_cache(loaded: LoadedModel, layout: Layout, spec: str, count: int) -> EvalData:
    from engine.cache.build import resolve_cache_path
    from engine.data import DataOrder, read_flags, read_sequences

    cache = PackedCache(resolve_cache_path(spec, layout))
    _check_tokenizer(loaded, cache)
    if cache.seq_len > loaded.context:
        raise UserError(f"cache {cache.path} has sequences of {cache.seq_len} tokens; {loaded.display_name} was "
                        f"trained on {loaded.context}")
    everything = DataOrder(seed=0, chunk_sizes=cache.chunk_sizes, train_chunks=[], eval_chunks=cache.chunk_ids)
    ids = everything.eval_ids(count)  # the first `count` sequences in chunk order
    if len(ids) == 0:
        raise UserError(f"cache {cache.path} holds no sequences")
    return EvalData(rows=read_sequences(cache, ids), kind="cache", spec=str(cache.path), tokenizer=_tok(cache),
                    label=f"cache {cache.dataset_name}, {len(ids):,} sequences", flags=read_flags(cache, ids))


def from_source(loaded: LoadedModel, spec: str, count: int) -> EvalData:
    from engine.cache.chunks import np_dtype, pack
    from engine.cache.sources import open_source
    from engine.cache.worker import BuildSpec, ChunkEncoder

    source = open_source(DataConfig(source=spec))
    row = loaded.context + 1
    encoder = ChunkEncoder(BuildSpec(cache_dir="", tokenizer_file=str(loaded.tokenizer_file), seq_len=loaded.context,
                                     dtype="uint32", eos_id=loaded.eos_id))
    docs: list[list[int]] = []
    tokens, pending = 0, []
    for text in source.iter_texts():
        pending.append(text)
        if len(pending) == SOURCE_DOCS_PER_ENCODE:
            encoded, pending = encoder.encode(pending), []
            docs += encoded
            tokens += sum(len(ids) + 1 for ids in encoded)
            if tokens >= count * row:
                break
    else:
        docs += encoder.encode(pending)
    rows = pack(docs, eos_id=loaded.eos_id, seq_len=loaded.context, dtype=np_dtype("uint32")).rows[:count]
    if len(rows) == 0:
        raise UserError(f"source {spec!r} holds fewer than the {row} tokens of one sequence")
    return EvalData(rows=rows.astype(np.int64), kind="source", spec=spec, tokenizer=loaded.tokenizer_file,
                    label=f"source {source.spec}, {len(rows):,} sequences")


def _tok(cache: PackedCache) -> Path:
    return cache.tokenizer_dir / TOKENIZER_FILE


def _check_tokenizer(loaded: LoadedModel, cache: PackedCache) -> None:
    problem = check_cache_tokenizer(cache.path, cache.meta)
    if problem is not None:
        raise UserError(f"cache {cache.path}: {problem}")
    if not same_tokenizer(_tok(cache), loaded.tokenizer_file):
        spec = (cache.meta.get("tokenizer") or {}).get("spec", "?")
        raise UserError(f"cache {cache.path} was built with another tokenizer ({spec}) than {loaded.display_name}; "
                        f"evaluate on the text with --source SPEC, or build a cache with --tokenizer {loaded.path}")
