"""Which folder a cache lives in and what its dataset is called, from a data config alone.

Apart from the source readers (engine.cache.sources, which load `datasets`) so the TUI, which
must never import them, names and finds caches by the very rule the builder uses.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from engine.config import DataConfig
from engine.paths import Layout

TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).suffix.lower() in (*TEXT_SUFFIXES, *RECORD_BUILDERS) \
        or spec.count("/") > 1


def is_hub_name(spec: str) -> bool:
    return not looks_like_path(spec) and bool(HUB_NAME_RE.match(spec))


def cache_path_for(data: DataConfig, layout: Layout) -> Path:
    """The folder a cache for `data` lives in: --cache, else cache/packed_sequences/<seq_len>/<name>."""
    if data.cache:
        return Path(data.cache).expanduser().resolve()
    return layout.cache_dir(data.seq_len, derive_dataset_name(data))


def derive_dataset_name(data: DataConfig) -> str:
    """'stdlib' -> 'stdlib'; 'HuggingFaceFW/fineweb-edu' + subset 'sample-10BT' -> 'fineweb-edu-sample-10BT';
    './data/stories.jsonl' -> 'stories'; always a legal folder name."""
    if data.dataset_name:
        return data.dataset_name
    spec = (data.source or "data").strip().rstrip("/")
    if spec == "stdlib":
        return "stdlib"
    local = os.path.exists(os.path.expanduser(spec)) or glob.has_magic(spec) or looks_like_path(spec)
    if local:
        path = Path(os.path.expanduser(spec))
        while glob.has_magic(str(path)) and path != path.parent:
            path = path.parent
        base = path.stem if path.suffix else path.name or "data"
    else:
        base = spec.split("/")[-1] + (f"-{data.subset}" if data.subset else "")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-")[:64]
    return name or "data"
