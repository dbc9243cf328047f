"""MANIFEST.json of a committed checkpoint, its checks, and the cached verdicts of the full check.

The cheap check (every listed file present, a regular file, with its recorded size) catches torn
saves and truncation; the full check hashes every file (xxh3) and catches a flipped byte too.
Hashing gigabytes on every listing would be slow, so a full check's verdict is remembered, keyed
by each file's (size, mtime_ns) as it was before hashing: in memory for the process, and for the
next process in `checkpoints/<model>/.verified.json` (beside the checkpoints, never inside one:
a file added to a committed folder would not be in its MANIFEST). A changed file changes its key,
so the next listing hashes it again. Loading (resume, export) never trusts the file of verdicts.

Import-light (json, os, xxhash): the catalog, and so the TUI, lists with it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import xxhash

from engine.atomic import atomic_write_text, read_json

MANIFEST = "MANIFEST.json"
HASH_ALGO = "xxh3_64"
VERDICTS_FORMAT = "packtrain.verdicts/1"

Signature = tuple[tuple[str, int, int], ...]  # (file, size, mtime_ns) of each listed file and the MANIFEST
_memory: dict[Path, tuple[Signature, str | None]] = {}


class InvalidCheckpoint(ValueError):
    """A checkpoint folder that must not be loaded; the message is the reason, one line."""


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """MANIFEST.json as {file: {"bytes": int, "hash": "<algo>:<hex>"}}; raises InvalidCheckpoint."""
    try:
        manifest = read_json(path / MANIFEST)
    except FileNotFoundError:
        raise InvalidCheckpoint("MANIFEST.json is missing (save did not finish)") from None
    except (OSError, ValueError) as e:
        raise InvalidCheckpoint(f"MANIFEST.json is unreadable: {e}") from None
    if not isinstance(manifest, dict) or not manifest:
        raise InvalidCheckpoint("MANIFEST.json is not a packtrain manifest")
    for name, entry in manifest.items():
        if os.sep in name or name.startswith(".") or not isinstance(entry, dict):
            raise InvalidCheckpoint(f"MANIFEST.json has a foreign entry {name!r}")
        if type(entry.get("bytes")) is not int or not isinstance(entry.get("hash"), str):
            raise InvalidCheckpoint(f"MANIFEST.json entry {name!r} lacks bytes or hash")
    return manifest


def check_sizes(path: Path, manifest: dict[str, dict[str, Any]]) -> Signature:
    """Every listed file exists as a regular file with its recorded size (catches torn copies and
    truncation); returns the signature a verdict is keyed by."""
    entries = []
    for name in sorted(manifest) + [MANIFEST]:
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            raise InvalidCheckpoint(f"{name} is missing") from None
        if not stat.S_ISREG(st.st_mode):  # a symlink would read (and export) a file from elsewhere
            raise InvalidCheckpoint(f"{name} is not a regular file")
        if name != MANIFEST and st.st_size != manifest[name]["bytes"]:
            raise InvalidCheckpoint(f"{name} is {st.st_size:,} bytes, the manifest says {manifest[name]['bytes']:,}")
        entries.append((name, st.st_size, st.st_mtime_ns))
    return tuple(entries)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder is unusable by the cheap check, or None when it looks complete."""
    try:
        check_sizes(path, read_manifest(path))
    except InvalidCheckpoint as e:
        return str(e)
    return None


def hash_file(path: Path, *, fsync: bool = False) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return f"{HASH_ALGO}:{h.hexdigest()}"


def verify(path: Path, verdicts: "Verdicts | None" = None) -> str | None:
    """The full check (manifest, sizes, every file's hash): None when intact, else why not.

    A verdict already known for the files exactly as they are now (in this process, or in
    `verdicts` when given) is returned without hashing; a fresh one is remembered in both."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
        signature = check_sizes(path, manifest)
    except InvalidCheckpoint as e:
        return str(e)
    for known in (_memory.get(path), verdicts.get(path.name) if verdicts is not None else None):
        if known is not None and known[0] == signature:
            remember(path, signature, known[1], verdicts)
            return known[1]
    problem = _hash_problem(path, manifest)
    remember(path, signature, problem, verdicts)
    return problem


def remember(path: Path, signature: Signature, problem: str | None, verdicts: "Verdicts | None" = None) -> None:
    _memory[Path(path)] = (signature, problem)
    if verdicts is not None:
        verdicts.put(Path(path).name, signature, problem)


def _hash_problem(path: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    for name, entry in manifest.items():
        if not entry["hash"].startswith(f"{HASH_ALGO}:"):
            return f"{name} uses unknown hash {entry['hash'].split(':')[0]!r}"
        try:
            if hash_file(path / name) != entry["hash"]:
                return f"{name} is corrupt (hash mismatch)"
        except OSError as e:
            return f"{name} is unreadable: {e.strerror or e}"
    return None


class Verdicts:
    """One model's persisted verdicts (`.verified.json`): read tolerantly, since a missing or
    damaged file only means hashing again, and written only when something changed."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.entries: dict[str, tuple[Signature, str | None]] = {}
        self.changed = False
        try:
            data = read_json(file)
        except (OSError, ValueError):
            return
        entries = data.get("checkpoints") if isinstance(data, dict) and data.get("format") == VERDICTS_FORMAT else None
        for name, entry in (entries if isinstance(entries, dict) else {}).items():
            parsed = _parse_entry(entry)
            if parsed is not None:
                self.entries[name] = parsed

    def get(self, name: str) -> tuple[Signature, str | None] | None:
        return self.entries.get(name)

    def put(self, name: str, signature: Signature, problem: str | None) -> None:
        if self.entries.get(name) != (signature, problem):
            self.entries[name] = (signature, problem)
            self.changed = True

    def save(self) -> None:
        """Write the verdicts of the folders that still exist; a read-only root just hashes again."""
        if not self.changed:
            return
        folder = self.file.parent
        kept = {name: {"files": [list(e) for e in sig], "problem": problem}
                for name, (sig, problem) in sorted(self.entries.items()) if (folder / name).is_dir()}
        try:
            atomic_write_text(self.file, json.dumps({"format": VERDICTS_FORMAT, "checkpoints": kept}) + "\n")
        except OSError:
            return
        self.changed = False


def _parse_entry(entry: Any) -> tuple[Signature, str | None] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        return None
    problem = entry.get("problem")
    files = entry["files"]
    if not (problem is None or isinstance(problem, str)) or not all(
            isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and type(f[1]) is int and type(f[2]) is int
            for f in files):
        return None
    return tuple((f[0], f[1], f[2]) for f in files), problem
