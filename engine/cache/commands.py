"""`packtrain-engine cache build|fill|validate|info|list`: the stable CLI of the packed cache.

Parsers import nothing heavy; each handler imports what it needs. With --events, progress and
the result go to stdout as protocol JSON lines (an error too, before the usual `error:` line).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from engine.config import DataConfig, RunConfig
from engine.errors import UserError, shown
from engine.paths import Layout
from engine.units import format_bytes

DEFAULTS = DataConfig()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="build, grow, fill, validate and inspect packed token caches",
                           description="Packed LZ4 sequence caches under cache/packed_sequences/<seq_len>/<dataset>/.")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    b = actions.add_parser("build", help="build a cache, or continue/grow one (forward mode)",
                           description="Tokenize a dataset into fixed-length sequences and write LZ4 chunks. "
                           "Rerunning continues after a crash; a larger --max-docs/--max-chunks appends chunks.")
    b.add_argument("--config", metavar="YAML", help="take defaults from a run config's data section")
    b.add_argument("--source", metavar="SPEC", help=f"stdlib, a local file/folder/glob or a hub dataset (default {DEFAULTS.source})")
    b.add_argument("--dataset-name", metavar="NAME", help="cache folder name (default: derived from the source)")
    b.add_argument("--tokenizer", metavar="SPEC",
                   help=f"bytes, bpe:<vocab>, a hub name, a folder or a tokenizer.json (default {DEFAULTS.tokenizer})")
    b.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per training sequence (default {DEFAULTS.seq_len})")
    b.add_argument("--subset", metavar="S", help="hub dataset subset/config, e.g. sample-10BT")
    b.add_argument("--split", metavar="S", help=f"hub dataset split (default {DEFAULTS.split})")
    b.add_argument("--text-column", metavar="C", help=f"record field holding the text (default {DEFAULTS.text_column})")
    b.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read records as a stream instead of downloading/converting them first")
    b.add_argument("--docs-per-chunk", type=int, metavar="D", help="documents per chunk (default: ~1/32 of the text)")
    limit = b.add_mutually_exclusive_group()
    limit.add_argument("--max-docs", type=int, metavar="N", help="use the first N documents (rounded up to whole chunks)")
    limit.add_argument("--max-chunks", type=int, metavar="N", help="build the first N chunks")
    b.add_argument("--cache", metavar="PATH", help="explicit cache folder instead of cache/packed_sequences/<seq_len>/<name>")
    _pool_flags(b)
    b.add_argument("--shard", metavar="k/N", help="build only chunks k, k+N, k+2N, ... (one builder per shard)")
    b.add_argument("--force-rebuild", action="store_true", help="delete the cache and start over")
    b.set_defaults(handler=events_guard(_build))

    f = actions.add_parser("fill", help="build only the missing chunks of a cache (gap filling)")
    f.add_argument("path", metavar="PATH", help="cache folder (or <seq_len>/<dataset>)")
    _pool_flags(f)
    f.set_defaults(handler=events_guard(_fill))

    v = actions.add_parser("validate", help="check every chunk; --repair rebuilds exactly the bad ones",
                           description="Exit 0 when valid, 1 when not.")
    v.add_argument("path", metavar="PATH", help="cache folder (or <seq_len>/<dataset>)")
    v.add_argument("--repair", action="store_true", help="rebuild bad chunks and remove stray files")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _pool_flags(v)
    v.set_defaults(handler=events_guard(_validate))

    i = actions.add_parser("info", help="metadata and stats of one cache")
    i.add_argument("path", metavar="PATH", help="cache folder (or <seq_len>/<dataset>)")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(handler=_info)

    ls = actions.add_parser("list", help="caches under this root and in cache/cache_registry.json")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(handler=_list)


def _pool_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, metavar="W", help="worker processes (default: one per core)")
    p.add_argument("--events", action="store_true", help="print protocol JSON lines on stdout instead of a progress bar")


def events_guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """With --events, a parent reading stdout also gets the error as an event."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except UserError as e:
            if args.events:
                from engine.protocol import Error, encode

                print(encode(Error(message=str(e))), flush=True)
            raise
    return run


MAX_WORKERS = 1024


def check_workers(workers: int | None) -> int | None:
    """--workers for any command that may build a cache: a process count, or None for one per core."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers must be at least 1 and at most {MAX_WORKERS:,}, got {shown(workers)}")
    return workers


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    data = RunConfig.load(args.config).data if args.config else DataConfig()
    for f in fields(DataConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(data, f.name, value)
    return data


def _build(args: argparse.Namespace) -> int:
    from engine.cache.build import build_cache, parse_shard
    from engine.cache.progress import CacheReporter

    workers = check_workers(args.workers)
    shard = parse_shard(args.shard) if args.shard is not None else None
    with CacheReporter(args.events) as report:
        path = build_cache(data_config_from_args(args), Layout.resolve(), workers=workers, shard=shard,
                           force_rebuild=args.force_rebuild, on_event=report)
    if not args.events:
        _print_ready(path)
    return 0


def _fill(args: argparse.Namespace) -> int:
    from engine.cache.build import fill_cache
    from engine.cache.progress import CacheReporter

    workers = check_workers(args.workers)
    with CacheReporter(args.events) as report:
        built = fill_cache(args.path, workers=workers, on_event=report, layout=Layout.resolve())
    if not args.events:
        print(f"Filled {len(built):,} chunk{'s' if len(built) != 1 else ''}" +
              (f": {_ids(built)}" if built else " (nothing was missing)"))
        from engine.cache.build import resolve_cache_path

        _print_ready(resolve_cache_path(args.path))
    return 0


def _ids(ids: list[int]) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:20])) + (f", ... ({len(ids) - 20} more)" if len(ids) > 20 else "")


def _print_ready(path: Any) -> None:
    from engine.cache.metadata import data_summary, load_metadata, summary
    from engine.protocol import CacheReady

    meta = load_metadata(path)
    ready = CacheReady(cache=str(path), chunks=len(meta["chunks"]), sequences=summary(meta)["sequences"],
                       **data_summary(meta))
    print(f"Cache ready: {ready.chunks:,} chunks, {ready.sequences:,} sequences in {path} ({ready.data_line()})")


def _validate(args: argparse.Namespace) -> int:
    from engine.cache.progress import CacheReporter
    from engine.cache.validate import validate_cache

    workers = check_workers(args.workers)
    with CacheReporter(args.events) as report:
        result = validate_cache(args.path, repair=args.repair, on_event=report, workers=workers, layout=Layout.resolve())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.events:
        for line in result.lines():
            print(line)
    return 0 if result.ok else 1


def _info(args: argparse.Namespace) -> int:
    from engine.cache.build import resolve_cache_path
    from engine.cache.metadata import load_metadata
    from engine.cache.stats import compute_stats, format_report

    path = resolve_cache_path(args.path)
    meta = load_metadata(path)
    stats = compute_stats(meta)
    if args.json:
        print(json.dumps({"path": str(path), **stats}, indent=2))
        return 0
    print(format_report(stats), end="")
    print(f"\npath: {path}\ngeneration {meta['generation']}, manifest {meta.get('manifest_hash', '')[:16]}, "
          f"{meta['docs_per_chunk']:,} documents per chunk, eos id {meta['eos_id']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from engine.cache.registry import list_caches

    caches = list_caches(Layout.resolve())
    if args.json:
        print(json.dumps(caches, indent=2))
        return 0
    if not caches:
        print(f"no caches under {Layout.resolve().cache_root}")
        return 0
    rows = [("DATASET", "SEQ_LEN", "CHUNKS", "SEQUENCES", "SIZE", "TOKENIZER", "STATUS", "PATH")]
    for c in caches:
        if c["status"] == "ok":
            rows.append((str(c["dataset_name"]), str(c["seq_len"]), f"{c['chunks']:,}", f"{c['sequences']:,}",
                         format_bytes(c["compressed_bytes"]), str(c["tokenizer"]), "ok", c["path"]))
        else:
            rows.append(("?", "?", "?", "?", "?", "?", c["status"], c["path"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0

