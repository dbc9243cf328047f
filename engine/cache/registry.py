"""cache/cache_registry.json: every cache this root has built, including ones outside it (--cache).

Import-light on purpose (json, fcntl): the TUI lists caches with `list_caches`. The registry
says where caches are; each cache's own metadata stays the truth about what it holds, so a
listing re-reads it and also scans cache/packed_sequences/ for caches the registry missed.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from engine.atomic import TMP_PREFIX, atomic_write_json
from engine.cache.metadata import METADATA_FILE, load_metadata, summary
from engine.errors import UserError
from engine.paths import Layout

REGISTRY_VERSION = 1


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    caches = data.get("caches") if isinstance(data, dict) else None
    return caches if isinstance(caches, dict) else {}


def register_cache(layout: Layout, cache_dir: Path, meta: dict[str, Any]) -> None:
    """Record (or refresh) one cache; concurrent builders serialise on the registry's flock."""
    layout.cache_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.cache_root / "cache_registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in layout.cache_root.glob(f"{TMP_PREFIX}{layout.cache_registry.name}-*"):
            stale.unlink(missing_ok=True)  # every writer holds the lock, so this is a dead writer's
        caches = _read(layout.cache_registry)
        caches[str(cache_dir)] = summary(meta)
        atomic_write_json(layout.cache_registry, {"version": REGISTRY_VERSION, "caches": caches})
    finally:
        os.close(fd)


def list_caches(layout: Layout) -> list[dict[str, Any]]:
    """One dict per cache: summary fields plus `path` and `status` (ok | broken | missing)."""
    paths = set(_read(layout.cache_registry))
    if layout.packed_root.is_dir():
        paths.update(str(p.parent) for p in layout.packed_root.glob(f"*/*/{METADATA_FILE}"))
    out = []
    for p in sorted(paths):
        entry: dict[str, Any] = {"path": p}
        if not Path(p).is_dir():
            entry["status"] = "missing"
        else:
            try:
                entry.update(summary(load_metadata(p)), status="ok")
            except UserError as e:
                entry.update(status="broken", error=str(e))
        out.append(entry)
    return out
