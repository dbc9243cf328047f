"""Crash-safe writes: every file that matters goes tmp -> fsync -> rename -> fsync(dir).

A crash or kill -9 at any point leaves either the old file or the new one, never a torn one.
Temporary names start with '.tmp-' so readers and repair passes can recognise and drop them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable; without it a power cut can undo the rename."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(target: Path) -> Path:
    """A unique sibling temporary name, so two writers never share a half-written file."""
    return target.with_name(f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes | memoryview, *, sync_dir: bool = True) -> None:
    target = Path(target)
    tmp = tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def atomic_write_text(target: str | os.PathLike[str], text: str, *, sync_dir: bool = True) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), sync_dir=sync_dir)


def atomic_write_json(target: str | os.PathLike[str], obj: Any, *, sync_dir: bool = True) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n", sync_dir=sync_dir)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_tmp(folder: str | os.PathLike[str], *, keep: Collection[str] = ()) -> list[Path]:
    """Drop temporaries a crashed writer left behind (except the names in `keep`); returns what was
    removed. Call it only where no live writer can be mid-write, e.g. under the folder's lock."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if p.name.startswith(TMP_PREFIX) and p.name not in keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
