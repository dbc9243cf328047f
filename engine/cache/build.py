"""Build, grow and fill a packed cache (DESIGN §2).

Forward mode (`build_cache`): every chunk of the planned range that is not committed, or is
listed but missing/truncated, is built; a rerun after a crash or kill -9 therefore continues
where it stopped and, since chunk k depends only on documents [k*D, (k+1)*D), ends with the same
bytes and manifest_hash as an uninterrupted build. Raising --max-docs/--max-chunks grows the
plan. Gap mode (`fill_cache`) rebuilds only what is missing, from the metadata alone.

Commit protocol: workers write `.tmp-*`, fsync and rename chunk files; the builder then lists
them by replacing cache_metadata.json atomically (under metadata.lock, merging with what other
shard builders committed) and fsyncing the folder. Unlisted chunk files and `.tmp-*` left by a
dead builder are removed at the next start.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import TMP_PREFIX, fsync_dir
from engine.cache.locks import builder_lock, is_lock_file, metadata_lock
from engine.cache.metadata import (CODEC, FORMAT, FORMAT_VERSION, HASH_ALGO, METADATA_FILE, REPORT_FILE, STATS_FILE,
                                   TOKENIZER_DIR, chunk_id_of, data_summary, dtype_name_for_vocab, load_metadata,
                                   metadata_path, record_format, save_metadata)
from engine.cache.naming import cache_path_for, derive_dataset_name
from engine.cache.records import chat_template, require_template
from engine.cache.registry import register_cache
from engine.cache.sources import Source, open_source
from engine.cache.stats import write_stats
from engine.cache.tokenizer import (TokenizerPlan, check_cache_tokenizer, check_hub_tokenizer, parse_tokenizer_spec,
                                    prepare_tokenizer, tokenizer_file, write_tokenizer)
from engine.cache.worker import BuildSpec, ChunkTask, build_chunk, init_worker
from engine.config import DataConfig, check_data
from engine.errors import UserError
from engine.paths import Layout
from engine.protocol import CacheProgress, CacheReady, Event
from engine.protocol import Warning as WarningEvent

__all__ = ["build_cache", "fill_cache", "rebuild_chunks", "cache_path_for", "derive_dataset_name", "parse_shard",
           "resolve_cache_path"]

EventSink = Callable[[Event], None]
COMMIT_INTERVAL_S = 1.0  # the first chunk is committed at once, then at most once a second
PROGRESS_INTERVAL_S = 0.25
OWN_NAMES = {METADATA_FILE, TOKENIZER_DIR, STATS_FILE, REPORT_FILE}


def resolve_cache_path(path: str | Path, layout: Layout | None = None) -> Path:
    """A cache folder, or `<seq_len>/<dataset>` relative to cache/packed_sequences/."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute():
        candidate = (layout or Layout.resolve()).packed_root / p
        if candidate.exists():
            return candidate.resolve()
        raise UserError(f"cache {path} not found: neither {p.resolve()} nor {candidate} exists")
    return p.resolve()


def parse_shard(text: str) -> tuple[int, int]:
    """'k/N' -> (k, N): this builder makes chunks k, k+N, k+2N, ..."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected k/N, e.g. 0/4") from None
    return _check_shard((k, n))


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise UserError(f"--shard {shard[0]}/{shard[1]}: need 0 <= k < N")
    return shard


def _check_place(path: Path, layout: Layout) -> None:
    """A --cache folder among checkpoints or run logs would read as a model or be swept with them."""
    for managed in (layout.checkpoints_root.resolve(), layout.logs_root.resolve()):
        if path == managed or managed in path.parents:
            raise UserError(f"refusing cache folder {path}: it is inside {managed}, which holds models and logs")


def _check_writable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"cache path {path} exists and is not a folder")
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {anchor}: {'not a folder' if not anchor.is_dir() else 'permission denied'}")


def _is_own(name: str) -> bool:
    return name in OWN_NAMES or name.startswith(TMP_PREFIX) or chunk_id_of(name) is not None or is_lock_file(name)


def _check_foreign(path: Path) -> None:
    """Never adopt (and later clean) a folder that holds someone else's files."""
    if path.is_dir() and not metadata_path(path).exists():
        foreign = sorted(p.name for p in path.iterdir() if not _is_own(p.name))
        if foreign:
            raise UserError(f"{path} is not empty and is not a packed cache (it holds {', '.join(foreign[:3])}); "
                            "choose another folder")


def _try_metadata(path: Path, *, tolerate_corrupt: bool = False) -> dict[str, Any] | None:
    """None when there is no metadata; corrupt metadata is an error unless we are starting over."""
    if not metadata_path(path).exists():
        return None
    try:
        return load_metadata(path)
    except UserError:
        if tolerate_corrupt:
            return None
        raise


def _check_compatible(meta: dict[str, Any], path: Path, data: DataConfig, plan: TokenizerPlan,
                      source: Source | None) -> None:
    """A rerun may grow a cache, never change what its existing chunks mean."""
    fix = "use --force-rebuild to start over or another --dataset-name"
    src = meta.get("source") or {}
    if meta["seq_len"] != data.seq_len:
        raise UserError(f"cache {path} has seq_len {meta['seq_len']}, not {data.seq_len}; {fix}")
    if (meta.get("tokenizer") or {}).get("spec") != plan.spec:
        raise UserError(f"cache {path} was built with tokenizer {meta['tokenizer'].get('spec')!r}, "
                        f"not {plan.spec!r}; {fix}")
    if data.docs_per_chunk is not None and data.docs_per_chunk != meta["docs_per_chunk"]:
        raise UserError(f"cache {path} has {meta['docs_per_chunk']} documents per chunk, not {data.docs_per_chunk}; {fix}")
    for key in ("text_column", "subset", "split"):
        if key in src and src[key] != getattr(data, key):
            raise UserError(f"cache {path} was built with {key.replace('_', '-')} {src[key]!r}, "
                            f"not {getattr(data, key)!r}; {fix}")
    problem = check_cache_tokenizer(path, meta)
    if problem:
        raise UserError(f"cache {path}: {problem}; {fix}")
    if source is not None:
        _check_source(meta, path, source)


def _check_source(meta: dict[str, Any], path: Path, source: Source) -> None:
    src = meta.get("source") or {}
    if src.get("spec") != source.spec:
        raise UserError(f"cache {path} was built from {src.get('spec')!r}, not {source.spec!r}; use --force-rebuild "
                        "to start over or another --dataset-name")
    if src.get("hash") != source.fingerprint():
        raise UserError(f"source {source.spec!r} changed since cache {path} was built (its files or sizes differ), so "
                        "chunks cannot be rebuilt identically; use --force-rebuild to start over")


def _source_from_meta(meta: dict[str, Any], path: Path) -> Source:
    src = meta.get("source") or {}
    data = DataConfig(source=src.get("spec"), subset=src.get("subset"), split=src.get("split") or "train",
                      text_column=src.get("text_column") or "text", streaming=bool(src.get("streaming")))
    source = open_source(data)
    _check_source(meta, path, source)
    return source


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _cleanup(path: Path, meta: dict[str, Any] | None, shard: tuple[int, int] | None) -> list[str]:
    """Remove unlisted chunk files and temporaries; a shard builder leaves other shards' alone.
    Call under metadata.lock (metadata and tokenizer temporaries are written under it)."""
    listed = {c["file"] for c in meta["chunks"]} if meta else set()
    removed = []
    for p in sorted(path.iterdir()):
        name = p.name
        is_tmp = name.startswith(TMP_PREFIX)
        k = chunk_id_of(name[len(TMP_PREFIX):].rsplit("-", 1)[0] if is_tmp else name)
        if not is_tmp and (k is None or name in listed):
            continue
        if shard is not None and k is not None and k % shard[1] != shard[0]:
            continue
        _remove(p)
        removed.append(name)
    return removed


def _gaps(path: Path, meta: dict[str, Any], wanted: Callable[[int], bool]) -> dict[int, str]:
    """Listed chunks whose file is missing or has the wrong size (a cheap check; validate hashes)."""
    gaps = {}
    for c in meta["chunks"]:
        if not wanted(c["id"]):
            continue
        try:
            ok = (path / c["file"]).stat().st_size == c["compressed_bytes"]
        except FileNotFoundError:
            ok = False
        if not ok:
            gaps[c["id"]] = c["hash"]
    return gaps


def _shard_filter(shard: tuple[int, int] | None) -> Callable[[int], bool]:
    return (lambda k: True) if shard is None else (lambda k: k % shard[1] == shard[0])


# --- creating a cache -----------------------------------------------------------------------------


def _create(path: Path, data: DataConfig, source: Source, plan: TokenizerPlan, previous: dict[str, Any] | None,
            on_event: EventSink | None) -> dict[str, Any]:
    """Start a cache from nothing (or over a force-rebuilt one). Under both locks."""
    _emit(on_event, CacheProgress(stage="tokenizer", cache=str(path)))
    prepared = prepare_tokenizer(plan, source)
    require_template(source.record_format, getattr(prepared.hf, "chat_template", None), plan.spec)
    if plan.kind == "bpe" and prepared.vocab_size < plan.bpe_vocab:
        _emit(on_event, WarningEvent(message=f"tokenizer {plan.spec}: the source has too little text for "
                                             f"{plan.bpe_vocab:,} tokens; the trained vocabulary has "
                                             f"{prepared.vocab_size:,}"))
    docs_per_chunk = data.docs_per_chunk or source.default_docs_per_chunk()
    if metadata_path(path).exists():  # force-rebuild: readers lose the old cache before its files go
        metadata_path(path).unlink()
        fsync_dir(path)
    for p in path.iterdir():
        if _is_own(p.name) and not is_lock_file(p.name):
            _remove(p)
    sha = write_tokenizer(path, prepared)
    now = time.time()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset_name": derive_dataset_name(data),
        "created": now, "updated": now,
        "source": source.identity(),
        "tokenizer": {"spec": plan.spec, "kind": plan.kind, "sha256": sha, "dir": TOKENIZER_DIR,
                      "eos_token": prepared.eos_token},
        "seq_len": data.seq_len, "row_len": data.seq_len + 1, "dtype": dtype_name_for_vocab(prepared.vocab_size),
        "vocab_size": prepared.vocab_size, "eos_id": prepared.eos_id, "docs_per_chunk": docs_per_chunk,
        "planned_chunks": None, "codec": CODEC, "hash_algo": HASH_ALGO,
        "generation": (previous["generation"] + 1) if previous else 0, "chunks": [], "builds": [],
    }
    save_metadata(path, meta)
    return meta


def _planned(meta: dict[str, Any], data: DataConfig, source: Source) -> int | None:
    """Chunks this run aims for; None = until a streaming source ends. --max-docs rounds up to whole
    chunks so a later, larger limit only appends."""
    d = meta["docs_per_chunk"]
    full = math.ceil(source.n_docs / d) if source.n_docs is not None else None
    if data.max_chunks is not None:
        target: int | None = data.max_chunks
    elif data.max_docs is not None:
        target = math.ceil(data.max_docs / d)
    else:
        target = full
    return target if target is None or full is None else min(target, full)


# --- the public entry points ----------------------------------------------------------------------


def build_cache(data: DataConfig, layout: Layout, *, workers: int | None = None, shard: tuple[int, int] | None = None,
                force_rebuild: bool = False, on_event: EventSink | None = None) -> Path:
    """Build or continue (forward mode) the cache for `data`; returns its folder."""
    check_data(data, where="")
    shard = _check_shard(shard)
    if shard is not None and force_rebuild:
        raise UserError("--force-rebuild cannot be combined with --shard: start over with one unsharded build first")
    plan = parse_tokenizer_spec(data.tokenizer)
    path = cache_path_for(data, layout)
    existing = None if force_rebuild else _try_metadata(path)
    if existing is not None:
        _check_compatible(existing, path, data, plan, None)
    else:
        check_hub_tokenizer(plan)
    source = open_source(data)
    if plan.kind != "hf":  # before a BPE is trained for nothing
        require_template(source.record_format, None, plan.spec)
    if existing is not None:
        _check_source(existing, path, source)
    _check_place(path, layout)
    _check_writable(path)
    _check_foreign(path)
    created = path  # the topmost folder this build creates: removed again if the first build fails
    while not created.parent.exists():
        created = created.parent
    created_any = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {path}: {e.strerror or e}") from None
    try:
        with builder_lock(path, shard):
            with metadata_lock(path):
                _check_foreign(path)
                previous = _try_metadata(path, tolerate_corrupt=force_rebuild)
                if previous is not None and not force_rebuild:
                    _check_compatible(previous, path, data, plan, source)
                    meta = previous
                else:
                    meta = _create(path, data, source, plan, previous, on_event)
                _cleanup(path, meta, shard)
            wanted_shard = _shard_filter(shard)
            gaps = _gaps(path, meta, wanted_shard)
            committed = {c["id"] for c in meta["chunks"]}
            run = _Run(path, meta, "build", workers, shard, on_event)
            run.execute(source, lambda k: wanted_shard(k) and (k not in committed or k in gaps),
                        _planned(meta, data, source), gaps)
    except BaseException:
        if created_any and not metadata_path(path).exists():
            shutil.rmtree(created, ignore_errors=True)  # a refused or interrupted first build leaves nothing
        raise
    run.raise_mismatches()
    chunks = run.meta["chunks"]
    if shard is None and not any(c["n_seqs"] for c in chunks):
        if existing is None:  # this build started the cache: a refused one leaves nothing behind
            _discard(path, created if created_any else None)
        raise UserError(f"no sequences: {sum(c['docs'][1] - c['docs'][0] for c in chunks):,} documents gave "
                        f"{sum(c['tokens'] for c in chunks):,} tokens in {len(chunks):,} chunk(s), and a sequence needs "
                        f"seq_len + 1 = {data.seq_len + 1:,} from one chunk; use a smaller --seq-len (or more documents "
                        "per chunk)")
    _finish(path, layout, on_event)
    return path


def _discard(path: Path, created: Path | None) -> None:
    """Remove a cache this build made: the topmost folder it created, else its own files."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for p in path.iterdir():
        if _is_own(p.name):
            _remove(p)


def fill_cache(path: str | Path, *, workers: int | None = None, on_event: EventSink | None = None,
               layout: Layout | None = None) -> list[int]:
    """Build only the missing chunks of the planned range (and listed chunks whose file is gone or
    truncated) from the metadata's own source and tokenizer; returns the chunk ids built."""
    path = resolve_cache_path(path, layout)
    load_metadata(path)  # refuse a folder that is not a cache before creating lock files in it
    with builder_lock(path):
        with metadata_lock(path):
            meta = load_metadata(path)
            _cleanup(path, meta, None)
        problem = check_cache_tokenizer(path, meta)
        if problem:
            raise UserError(f"cache {path}: {problem}, so missing chunks cannot be rebuilt identically; "
                            "use `cache build --force-rebuild`")
        source = _source_from_meta(meta, path)
        committed = {c["id"] for c in meta["chunks"]}
        planned = meta.get("planned_chunks")
        if planned is None:
            planned = max(committed) + 1 if committed else 0
        gaps = _gaps(path, meta, lambda k: True)
        run = _Run(path, meta, "fill", workers, None, on_event)
        run.execute(source, lambda k: k not in committed or k in gaps, planned, gaps)
    run.raise_mismatches()
    _finish(path, layout or Layout.resolve(), on_event)
    return sorted(run.built)


def rebuild_chunks(path: Path, chunk_ids: Iterable[int], *, workers: int | None = None,
                   on_event: EventSink | None = None, layout: Layout | None = None) -> tuple[list[int], list[int]]:
    """Repair: rebuild exactly these committed chunks, which must come out byte-identical to their
    records; returns (rebuilt, not reproducible). The caller holds no lock; this takes it."""
    ids = set(chunk_ids)
    with builder_lock(path):
        with metadata_lock(path):
            meta = load_metadata(path)
            _cleanup(path, meta, None)
        expect = {c["id"]: c["hash"] for c in meta["chunks"] if c["id"] in ids}
        run = _Run(path, meta, "repair", workers, None, on_event)
        if expect:
            source = _source_from_meta(meta, path)
            run.execute(source, lambda k: k in expect, max(expect) + 1, expect)
    _finish(path, layout or Layout.resolve(), on_event, ready=False)
    return sorted(run.built), sorted(run.mismatched)


def _finish(path: Path, layout: Layout, on_event: EventSink | None, *, ready: bool = True) -> None:
    meta = load_metadata(path)
    write_stats(path, meta)
    register_cache(layout, path, meta)
    if ready:
        _emit(on_event, CacheReady(cache=str(path), chunks=len(meta["chunks"]),
                                   sequences=sum(c["n_seqs"] for c in meta["chunks"]), **data_summary(meta)))


def _emit(on_event: EventSink | None, event: Event) -> None:
    if on_event is not None:
        on_event(event)


# --- one run of the worker pool --------------------------------------------------------------------


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver: workers never inherit the builder's tokenizer threads, locks or open files, and
    start in milliseconds once the server has imported the worker module."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["engine.cache.worker", "tokenizers"])
    return ctx


@dataclass
class _Run:
    path: Path
    meta: dict[str, Any]
    mode: str
    workers: int | None
    shard: tuple[int, int] | None
    on_event: EventSink | None
    built: list[int] = field(default_factory=list)
    mismatched: list[int] = field(default_factory=list)
    _pending: list[dict[str, Any]] = field(default_factory=list)
    _docs: int = 0
    _tokens: int = 0
    _text_bytes: int = 0
    _written: int = 0
    _total: int | None = None
    _source: Source | None = None
    _planned: int | None = None
    _started: float = field(default_factory=time.time)
    _last_commit: float = 0.0
    _commit_cost: float = 0.0  # seconds the last commit took: commits stay under ~5% of the builder's time
    _last_progress: float = 0.0

    def execute(self, source: Source, wanted: Callable[[int], bool], planned: int | None, expect: dict[int, str]) -> None:
        self._source, self._planned = source, planned
        self._started = time.time()
        self._total = None if planned is None else sum(1 for k in range(planned) if wanted(k))
        n_workers = max(1, self.workers or default_workers())
        if self._total is not None:
            n_workers = min(n_workers, max(1, self._total))
        spec = BuildSpec(str(self.path), str(tokenizer_file(self.path, self.meta)), self.meta["seq_len"],
                         self.meta["dtype"], self.meta["eos_id"], record_format(self.meta))
        require_template(record_format(self.meta), chat_template(Path(spec.tokenizer_file).parent), spec.tokenizer_file)
        self._progress(force=True)
        if self._total == 0:
            self._commit(final=True, n_workers=0)
            return
        tasks = (ChunkTask(c.chunk_id, c.start, c.end, c.payload, expect.get(c.chunk_id))
                 for c in source.chunks(self.meta["docs_per_chunk"], wanted, planned))
        pool = ProcessPoolExecutor(n_workers, mp_context=_pool_context(), initializer=init_worker,
                                   initargs=(spec, os.getpid()))
        inflight: dict[Future[dict[str, Any]], ChunkTask] = {}
        try:
            self._drive(pool, tasks, n_workers, inflight)
        except BrokenProcessPool:
            raise UserError("a build worker died (out of memory?); rerun the same command to continue") from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"building cache {self.path} failed: {e.strerror or e}{where}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for future in inflight:  # chunks that finished while we were stopping count too
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._record(future.result())
            self._commit(final=True, n_workers=n_workers)  # whatever finished stays, even on Ctrl-C
        self._progress(force=True)

    def _drive(self, pool: ProcessPoolExecutor, tasks: Iterable[ChunkTask], n_workers: int,
               inflight: dict[Future[dict[str, Any]], ChunkTask]) -> None:
        todo = iter(tasks)
        exhausted = False
        while True:
            while not exhausted and len(inflight) < 2 * n_workers:
                task = next(todo, None)
                if task is None:
                    exhausted = True
                else:
                    inflight[pool.submit(build_chunk, task)] = task
            if not inflight:
                return
            done, _ = wait(inflight, timeout=PROGRESS_INTERVAL_S, return_when=FIRST_COMPLETED)
            for future in done:
                del inflight[future]
                self._record(future.result())
            if self._pending and time.time() - self._last_commit >= max(COMMIT_INTERVAL_S, 20 * self._commit_cost):
                self._commit()
            self._progress()

    def _record(self, record: dict[str, Any]) -> None:
        if record.pop("mismatch", False):
            self.mismatched.append(record["id"])
            return
        self.built.append(record["id"])
        self._pending.append(record)
        self._docs += record["docs"][1] - record["docs"][0]
        self._tokens += record["tokens"]
        self._text_bytes += record["text_bytes"]
        self._written += record["compressed_bytes"]

    def _commit(self, *, final: bool = False, n_workers: int = 0) -> None:
        if not self._pending and not final:
            return
        started = time.time()
        with metadata_lock(self.path):
            meta = load_metadata(self.path)
            chunks = {c["id"]: c for c in meta["chunks"]}
            changed = [r for r in self._pending if chunks.get(r["id"], {}).get("hash") != r["hash"]]
            if changed:
                meta["generation"] += 1
            for r in changed:
                chunks[r["id"]] = {**r, "generation": meta["generation"]}
            meta["chunks"] = list(chunks.values())
            if self._source is not None and self._source.n_docs is not None:
                meta["source"]["n_docs"] = self._source.n_docs
            if self._planned is not None:
                meta["planned_chunks"] = max(meta.get("planned_chunks") or 0, self._planned)
            elif self._source is not None and self._source.n_docs is not None:
                meta["planned_chunks"] = math.ceil(self._source.n_docs / meta["docs_per_chunk"])
            if final:
                meta["builds"] = [*meta.get("builds", []), {
                    "mode": self.mode, "started": self._started, "seconds": round(time.time() - self._started, 3),
                    "chunks": len(self.built), "tokens": self._tokens, "text_bytes": self._text_bytes,
                    "workers": n_workers, "shard": list(self.shard) if self.shard else None}]
            meta["updated"] = time.time()
            save_metadata(self.path, meta)
            self.meta = meta
        self._pending = []
        self._last_commit = time.time()
        self._commit_cost = self._last_commit - started

    def _progress(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        elapsed = max(1e-9, now - self._started)
        done = len(self.built) + len(self.mismatched)
        eta = None
        if self._total is not None and done:
            eta = elapsed / done * (self._total - done)
        _emit(self.on_event, CacheProgress(
            stage="repair" if self.mode == "repair" else "build", cache=str(self.path), docs=self._docs,
            tokens=self._tokens, chunks_done=done, chunks_total=self._total or 0, bytes_written=self._written,
            mb_per_s=self._text_bytes / elapsed / 1e6, eta_s=eta))

    def raise_mismatches(self) -> None:
        if self.mismatched:
            ids = ", ".join(map(str, sorted(self.mismatched)[:8]))
            raise UserError(f"chunk(s) {ids} of {self.path} rebuilt with different content than recorded: the source "
                            "or tokenizer changed; use `cache build --force-rebuild`")
