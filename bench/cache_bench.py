"""Packed-cache benchmark: every figure is a ratio against a baseline measured in the same run.

    python bench/cache_bench.py [--source stdlib] [--tokenizer bpe:8192] [--seq-len 512] [--repeats 3]

1. build tokens/s (fill of every chunk: pool, read, tokenize, pack, LZ4, hash, write, commit) vs
   `tokenizers` encode_batch_fast alone on the same texts with the same number of threads;
   plus a one-process stage breakdown of what the build adds to encoding.
2. cache size vs raw uint16 and vs torch.save of int64 tensors (torch.save into memory, only to
   measure its size: it is never a packtrain format).
3. random batch reads (8 x seq_len+1 tokens) through PackedCache vs an open np.memmap of the same
   rows, on one core: warm (default decoded-chunk LRU) and cold (every row decodes its chunk).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.cache.build import build_cache, default_workers, fill_cache
from engine.cache.chunks import compress, pack, write_chunk_file
from engine.cache.metadata import load_metadata
from engine.cache.reader import PackedCache
from engine.cache.sources import open_source, payload_texts
from engine.cache.worker import BuildSpec, ChunkEncoder
from engine.config import DataConfig
from engine.paths import Layout


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_build(cache: Path, texts: list[str], tokens: int, workers: int, repeats: int) -> None:
    """Baseline and build alternate, so load from other processes hits both alike."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(cache / "tokenizer" / "tokenizer.json"))

    def encode() -> None:
        tok.encode_batch_fast(texts, add_special_tokens=False)

    def rebuild() -> None:
        for f in cache.glob("packed_chunk_*.lz4"):
            f.unlink()
        fill_cache(cache, workers=workers)

    first = median_time(rebuild, 1)
    base, build = [], []
    for _ in range(repeats):
        base.append(median_time(encode, 1))
        build.append(median_time(rebuild, 1))
    b, m = statistics.median(base), statistics.median(build)
    print(f"build: {tokens / m / 1e6:.3f} Mtok/s with {workers} worker processes; encode_batch_fast alone "
          f"({workers} threads): {tokens / b / 1e6:.3f} Mtok/s -> ratio {b / m:.3f} (build adds {100 * (m / b - 1):+.1f}%); "
          f"the first fill, which also starts the pool's forkserver, took {first - m:+.2f}s more")


def bench_stages(cache: Path, source_spec: str) -> None:
    """Where one process spends its time per chunk: what the build adds on top of encoding."""
    meta = load_metadata(cache)
    with tempfile.TemporaryDirectory() as scratch:
        enc = ChunkEncoder(BuildSpec(scratch, str(cache / "tokenizer" / "tokenizer.json"), meta["seq_len"],
                                     meta["dtype"], meta["eos_id"]))
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        t = dict.fromkeys(("read", "encode", "ids", "pack", "compress+hash", "write"), 0.0)
        source = open_source(DataConfig(source=source_spec))
        for c in source.chunks(meta["docs_per_chunk"], lambda k: True, None):
            t0 = time.perf_counter()
            texts = payload_texts(c.payload)
            t1 = time.perf_counter()
            encs = enc.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            t2 = time.perf_counter()
            ids = [e.ids for e in encs]
            t3 = time.perf_counter()
            packed = pack(ids, eos_id=meta["eos_id"], seq_len=meta["seq_len"], dtype=enc.dtype)
            t4 = time.perf_counter()
            data, _, _ = compress(packed.rows)
            t5 = time.perf_counter()
            write_chunk_file(Path(scratch), c.chunk_id, data)
            t6 = time.perf_counter()
            for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                t[key] += dt
    extra = sum(v for k, v in t.items() if k != "encode")
    print("stages (1 process, 1 thread): " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items())
          + f" -> everything but encode = {100 * extra / t['encode']:.1f}% of encode")


def bench_size(cache: PackedCache) -> None:
    import torch

    chunks = [cache.read_chunk(k) for k in cache.chunk_ids]
    compressed = sum(c["compressed_bytes"] for c in cache.meta["chunks"])
    tokens = sum(a.size for a in chunks)
    buf = io.BytesIO()
    torch.save([torch.from_numpy(a.astype(np.int64)) for a in chunks], buf)  # size reference only
    print(f"size: {compressed / 1e6:.2f} MB LZ4 = {compressed / (tokens * 2):.3f}x raw uint16 "
          f"({tokens * 2 / 1e6:.2f} MB), {compressed / buf.tell():.3f}x torch.save int64 ({buf.tell() / 1e6:.2f} MB)")


def bench_reads(cache_dir: Path, n_batches: int, batch: int = 8, window: int = 4) -> None:
    """Three access patterns against an open np.memmap (as a plain ndarray view: its fastest form)
    reading the same rows in the same order, one row copy at a time into the same batch buffer:
    warm   random rows, every chunk in the reader's LRU (the stdlib sample fits);
    window one epoch in the trainer's order (chunks permuted, rows shuffled within windows of
           `window` chunks), LRU limited to about one window of chunks;
    cold   random rows with no LRU: every row decodes its whole chunk (the worst case)."""
    cache = PackedCache(cache_dir)
    ids = cache.chunk_ids
    sizes = np.array([cache.chunk_sizes[k] for k in ids])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    row_tokens = cache.seq_len + 1
    rng = np.random.default_rng(0)
    random_rows = rng.integers(0, cache.n_sequences, size=n_batches * batch)
    order = []
    perm = rng.permutation(len(ids))
    for w in range(0, len(ids), window):
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in perm[w:w + window]])
        order.append(rng.permutation(rows))
    epoch_rows = np.concatenate(order)
    window_bytes = int(np.sort(sizes)[-window:].sum()) * row_tokens * cache.dtype.itemsize

    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "rows.bin"
        with open(flat, "wb") as f:
            for k in ids:
                f.write(cache.read_chunk(k).tobytes())
        mm = np.memmap(flat, dtype=cache.dtype, mode="r", shape=(cache.n_sequences, row_tokens)).view(np.ndarray)

        out = np.empty((batch, row_tokens), dtype=cache.dtype)

        def memmap_reads(rows: np.ndarray) -> None:
            for i in range(0, len(rows) - batch + 1, batch):
                for j, r in enumerate(rows[i:i + batch]):
                    out[j] = mm[r]

        def cache_reads(reader: PackedCache, rows: np.ndarray) -> None:
            where = np.searchsorted(starts, rows, side="right") - 1
            chunk_of, local = np.asarray(ids)[where].tolist(), (rows - starts[where]).tolist()
            for i in range(0, len(rows) - batch + 1, batch):
                reader.gather(chunk_of[i:i + batch], local[i:i + batch], out)

        results = []
        cold_rows = random_rows[: max(batch, len(random_rows) // 50)]
        for name, rows, make in (("warm", random_rows, lambda: PackedCache(cache_dir)),
                                 ("window", epoch_rows, lambda: PackedCache(cache_dir, cache_bytes=window_bytes)),
                                 ("cold", cold_rows, lambda: PackedCache(cache_dir, cache_bytes=0))):
            reader = make()
            if name == "warm":
                cache_reads(reader, rows)
            base = median_time(lambda: memmap_reads(rows), 3)
            ours = median_time(lambda: cache_reads(make() if name != "warm" else reader, rows), 3)
            results.append(f"{name} {len(rows) * row_tokens / ours / 1e6:.1f} Mtok/s = {base / ours:.3f}x memmap "
                           f"({len(rows) * row_tokens / base / 1e6:.0f})")
        del mm
    print(f"random batches ({batch} x {row_tokens} tokens, 1 core), PackedCache vs np.memmap (Mtok/s): "
          + "; ".join(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--tokenizer", default="bpe:8192")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=20000)
    ap.add_argument("--root", default=None, help="keep the benchmark cache here (default: a temporary folder)")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # baseline threads = build processes (set before first use)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout.resolve(args.root or tmp)
        data = DataConfig(source=args.source, tokenizer=args.tokenizer, seq_len=args.seq_len)
        t = time.perf_counter()
        path = build_cache(data, layout, workers=args.workers)
        cache = PackedCache(path)
        tokens = sum(c["tokens"] for c in cache.meta["chunks"])
        print(f"cache: {args.source}, {args.tokenizer}, seq_len {args.seq_len}: {len(cache.chunk_ids)} chunks, "
              f"{cache.n_sequences:,} sequences, {tokens:,} tokens (first build incl. tokenizer: "
              f"{time.perf_counter() - t:.1f}s); cores: {os.cpu_count()}")
        texts = list(open_source(data).iter_texts())
        bench_build(path, texts, tokens, args.workers, args.repeats)
        bench_stages(path, args.source)
        bench_size(cache)
        bench_reads(path, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
