"""What a data source string names, and where its cache lives: the rules the TUI shares with the builder.

Import-light on purpose (no `datasets`, no tokenizers), so the TUI's draft and the cache builder
derive the same folder from the same config.
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


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).suffix.lower() in (*TEXT_SUFFIXES, *RECORD_BUILDERS) \
        or spec.count("/") > 1


def cache_path_for(data: DataConfig, layout: Layout) -> Path:
    """The folder a cache for `data` lives in: --cache, else cache/packed_sequences/<seq_len>/<name>.
    Here rather than in build.py so the TUI (which must not load the builder) uses the same rule."""
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
