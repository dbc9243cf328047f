"""flock helpers: one builder per cache, and serialised metadata commits.

build.lock     exclusive for a build, fill, repair or force-rebuild; shared for `--shard k/N`
               builders, which also hold build-shard-k-of-N.lock so each shard has one builder.
metadata.lock  held briefly around every read-modify-write of cache_metadata.json, so shard
               builders on shared storage merge their commits instead of overwriting them.
Readers never lock. The kernel drops a flock when its holder dies, kill -9 included.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from engine.cache.metadata import LOCK_FILE, META_LOCK_FILE
from engine.control import flock_held
from engine.errors import UserError


@contextmanager
def hold(path: Path, *, shared: bool = False, wait: bool = False, busy: str = "") -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(busy or f"{path} is locked by another process") from None
        yield
    finally:
        os.close(fd)


def shard_lock_name(shard: tuple[int, int]) -> str:
    return f"build-shard-{shard[0]}-of-{shard[1]}.lock"


def is_lock_file(name: str) -> bool:
    return name in (LOCK_FILE, META_LOCK_FILE) or (name.startswith("build-shard-") and name.endswith(".lock"))


@contextmanager
def builder_lock(cache_dir: Path, shard: tuple[int, int] | None = None) -> Iterator[None]:
    if shard is None:
        with hold(cache_dir / LOCK_FILE, busy=f"another builder is working on cache {cache_dir}; wait for it to finish"):
            yield
        return
    with hold(cache_dir / LOCK_FILE, shared=True,
              busy=f"an unsharded build, fill or repair is running on cache {cache_dir}"), \
            hold(cache_dir / shard_lock_name(shard), busy=f"shard {shard[0]}/{shard[1]} of {cache_dir} is already being built"):
        yield


def metadata_lock(cache_dir: Path) -> AbstractContextManager[None]:
    return hold(cache_dir / META_LOCK_FILE, wait=True)


def builder_active(cache_dir: Path) -> bool:
    """True while any builder holds the cache (its unlisted files are then work in progress)."""
    return flock_held(cache_dir / LOCK_FILE)
