"""Data-loader benchmark: the loader's share of step time in the trainer's shuffled order.

The stdlib sample is built once as a byte-level cache at seq_len 256 in a temporary root. For each
shuffle budget (train.shuffle_buffer_mb), one epoch is read the way the loop reads it: DataOrder's
window sized by the budget, `order.take` and `read_sequences` through a PackedCache whose LRU of
decoded chunks has the same budget. The step it is compared with is a measured fp32 step of
train_bench's 13.8M model at micro-batch 8, in the same run. Target: the loader takes at most 1%
of step time. The worst of the first steps is shown too: a fully shuffled window touches a cold
chunk for almost every row until each chunk has been decoded once.

    python bench/data_bench.py [--budgets 1024,4] [--steps 4] [--first 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_bench import MICRO, MODEL, SEQ  # noqa: E402

from engine.backends.torch_model import build_model, hf_config, lm_loss, param_groups  # noqa: E402
from engine.cache import reader  # noqa: E402
from engine.cache.build import build_cache  # noqa: E402
from engine.config import DataConfig  # noqa: E402
from engine.data import DataOrder, read_sequences, rows_in_budget  # noqa: E402
from engine.paths import Layout  # noqa: E402


def step_seconds(cache: reader.PackedCache, steps: int) -> float:
    """Median seconds of an fp32 forward, backward and AdamW step of the benchmark model."""
    model = build_model(hf_config(MODEL), 1)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    rows = torch.from_numpy(read_sequences(cache, DataOrder.start(1, cache.chunk_sizes, 0).epoch_order(0)[:MICRO]))
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t = time.perf_counter()
        lm_loss(model, rows).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def read_epoch(path: Path, budget_mb: int) -> tuple[int, int, list[float]]:
    """(window rows, chunk decodes, seconds per step) for one epoch read as the training loop reads it."""
    decodes = 0
    real = reader.read_chunk_file

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal decodes
        decodes += 1
        return real(*args, **kwargs)

    reader.read_chunk_file = counted
    try:
        cache = reader.PackedCache(path, cache_bytes=budget_mb << 20)
        t = time.perf_counter()
        order = DataOrder.start(1, cache.chunk_sizes, 1, rows_in_budget(cache.cache_bytes, cache.seq_len, cache.dtype))
        epoch, cursor, times = 0, 0, []
        while epoch == 0:
            ids, epoch, cursor = order.take(epoch, cursor, min(MICRO, len(order.epoch_order(0)) - cursor))
            torch.from_numpy(read_sequences(cache, ids))
            now = time.perf_counter()
            times.append(now - t)
            t = now
    finally:
        reader.read_chunk_file = real
    return order.window_rows or 0, decodes, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="1024,4", help="train.shuffle_buffer_mb values, comma-separated")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps for the step time")
    ap.add_argument("--first", type=int, default=20, help="early steps whose worst read is shown")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="packtrain-data-bench-"))
    data = DataConfig(source="stdlib", dataset_name="stdlib", tokenizer="bytes", seq_len=SEQ)
    with contextlib.redirect_stdout(io.StringIO()):
        path = build_cache(data, Layout.resolve(root))
    cache = reader.PackedCache(path)
    step = step_seconds(cache, args.steps)
    decoded_mb = cache.n_sequences * (SEQ + 1) * cache.dtype.itemsize / 2 ** 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"cache: {len(cache.chunk_ids)} chunks, "
          f"{cache.n_sequences:,} rows, {decoded_mb:.1f} MB decoded; fp32 step of the {MICRO} x {SEQ} benchmark "
          f"model: {1000 * step:,.0f} ms (median of {args.steps})")
    for budget in (int(b) for b in args.budgets.split(",")):
        window, decodes, times = read_epoch(path, budget)
        mean, worst = statistics.mean(times), max(times[:args.first])
        share = "the whole cache" if window >= cache.n_sequences else f"1/{cache.n_sequences / window:.1f} of the cache"
        print(f"shuffle_buffer_mb {budget}: window {window:,} rows ({share}), "
              f"{decodes} chunk decodes in an epoch of {len(times):,} steps | loader share of step time: "
              f"{100 * mean / step:.3f}% mean ({1000 * mean:.2f} ms/step), {100 * worst / step:.2f}% worst of the "
              f"first {args.first} steps ({1000 * worst:.1f} ms; target <= 1%)")


if __name__ == "__main__":
    main()
