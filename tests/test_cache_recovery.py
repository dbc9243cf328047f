"""Crash safety and repair: kill -9 mid-build, damaged and stray chunks, torn or corrupt metadata."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lz4.frame
import numpy as np
import psutil
import pytest

from conftest import corpus_texts, write_txt_corpus
from engine.cache.chunks import raw_hash
from engine.cache.metadata import chunk_filename, load_metadata, save_metadata
from engine.cache.reader import ChunkError, PackedCache
from engine.cache.validate import validate_cache
from engine.errors import UserError


def engine(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "engine", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def chunk_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("packed_chunk_*.lz4"))}


def wait_gone(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.time() + timeout
    alive = procs
    while alive and time.time() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


def test_kill_9_mid_build_then_rerun_matches_uninterrupted(tmp_path: Path) -> None:
    corpus = write_txt_corpus(tmp_path / "corpus", corpus_texts(2000, seed=3, max_words=300))
    args = ["cache", "build", "--source", str(corpus), "--dataset-name", "k", "--tokenizer", "bpe:300",
            "--seq-len", "16", "--docs-per-chunk", "4", "--workers", "1"]
    victim = tmp_path / "victim"
    cache = victim / "cache" / "packed_sequences" / "16" / "k"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--root", str(victim), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    listed = 0
    while proc.poll() is None and listed == 0:
        if (cache / "cache_metadata.json").exists():
            listed = len(json.loads((cache / "cache_metadata.json").read_text())["chunks"])
        time.sleep(0.002)
    helpers = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the build ended before the kill: {proc.stderr.read()!r}"
    assert not wait_gone(helpers), "pool processes outlived the killed builder"
    partial = load_metadata(cache)
    assert 1 <= len(partial["chunks"]) < 500

    engine(victim, *args)
    engine(tmp_path / "reference", *args)
    resumed = load_metadata(cache)
    reference_dir = tmp_path / "reference" / "cache" / "packed_sequences" / "16" / "k"
    assert resumed["manifest_hash"] == load_metadata(reference_dir)["manifest_hash"]
    assert len(resumed["chunks"]) == 500
    assert chunk_files(cache) == chunk_files(reference_dir)
    assert not list(cache.glob(".tmp-*"))
    assert validate_cache(cache).ok


def damage(cache: Path) -> None:
    one = cache / chunk_filename(1)
    data = bytearray(one.read_bytes())
    data[len(data) // 2] ^= 0xFF
    one.write_bytes(bytes(data))
    four = cache / chunk_filename(4)
    four.write_bytes(four.read_bytes()[: four.stat().st_size // 2])
    shutil.copy(cache / chunk_filename(0), cache / chunk_filename(99))
    (cache / ".tmp-packed_chunk_000003.lz4-0badc0de").write_bytes(b"half a chunk")


def test_flipped_truncated_and_stray_are_found_and_repaired(tiny_cache: Path, root: Path) -> None:
    original = chunk_files(tiny_cache)
    n_seqs = PackedCache(tiny_cache).n_sequences
    damage(tiny_cache)
    reader = PackedCache(tiny_cache)
    with pytest.raises(ChunkError, match="chunk 1 .* is damaged.*--repair"):
        reader.read_chunk(1)

    bad = engine(root, "cache", "validate", str(tiny_cache), check=False)
    assert bad.returncode == 1, bad.stderr
    out = bad.stdout
    assert "bad chunk 1:" in out and "bad chunk 4: size" in out
    assert "stray file packed_chunk_000099.lz4" in out and "stray file .tmp-packed_chunk_000003.lz4-0badc0de" in out
    assert "Cache invalid: 2 bad chunks, 2 stray files" in out

    fixed = engine(root, "cache", "validate", str(tiny_cache), "--repair")
    assert "repaired chunk 1" in fixed.stdout and "repaired chunk 4" in fixed.stdout
    assert fixed.stdout.strip().splitlines()[-1] == f"Cache validated: 15 chunks, {n_seqs:,} sequences"
    assert chunk_files(tiny_cache) == original and not list(tiny_cache.glob(".tmp-*"))
    assert engine(root, "cache", "validate", str(tiny_cache)).returncode == 0


def test_chunk_from_another_tokenizer_is_detected(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    other = root / "other"
    engine(root, "cache", "build", "--source", str(tiny_corpus), "--tokenizer", "bpe:300", "--seq-len", "32",
           "--docs-per-chunk", "4", "--cache", str(other))
    original = (tiny_cache / chunk_filename(0)).read_bytes()
    shutil.copy(other / chunk_filename(0), tiny_cache / chunk_filename(0))
    report = validate_cache(tiny_cache)
    assert not report.ok and [k for k, _ in report.bad] == [0]
    assert validate_cache(tiny_cache, repair=True).ok
    assert (tiny_cache / chunk_filename(0)).read_bytes() == original


def test_token_ids_beyond_the_vocabulary_are_named(tiny_cache: Path) -> None:
    meta = load_metadata(tiny_cache)
    record = meta["chunks"][0]
    rows = np.full((record["n_seqs"], 33), 300, dtype="<u2")
    raw = rows.tobytes()
    data = lz4.frame.compress(raw, store_size=True, content_checksum=True)
    (tiny_cache / record["file"]).write_bytes(data)
    record.update(hash=raw_hash(raw), compressed_bytes=len(data))
    save_metadata(tiny_cache, meta)
    report = validate_cache(tiny_cache)
    assert report.bad == [(0, "token id 300 >= vocabulary size 257 (from another tokenizer?)")]
    with pytest.raises(ChunkError, match="token id 300 >= vocabulary size 257"):  # training: one line, no IndexError
        PackedCache(tiny_cache).read_chunk(0)
    repaired = validate_cache(tiny_cache, repair=True)  # the record itself is wrong: no identical rebuild exists
    assert not repaired.ok and "cannot be rebuilt identically" in repaired.problems[0]


def test_interrupted_metadata_write_is_ignored_then_cleaned(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    torn = tiny_cache / ".tmp-cache_metadata.json-0badc0de"
    torn.write_text((tiny_cache / "cache_metadata.json").read_text()[:100])
    assert PackedCache(tiny_cache).chunk_ids == list(range(15))
    assert validate_cache(tiny_cache).stray == [torn.name]
    engine(root, "cache", "build", "--source", str(tiny_corpus), "--dataset-name", "tiny", "--tokenizer", "bytes",
           "--seq-len", "32", "--docs-per-chunk", "4")
    assert not torn.exists() and validate_cache(tiny_cache).ok


def test_corrupt_metadata_is_one_line_and_force_rebuild_recovers(tiny_cache: Path, tiny_corpus: Path,
                                                                 root: Path) -> None:
    manifest = PackedCache(tiny_cache).manifest_hash()
    meta_file = tiny_cache / "cache_metadata.json"
    meta_file.write_text(meta_file.read_text()[:200])
    with pytest.raises(UserError, match="is corrupt"):
        PackedCache(tiny_cache)
    build_args = ["cache", "build", "--source", str(tiny_corpus), "--dataset-name", "tiny", "--tokenizer", "bytes",
                  "--seq-len", "32", "--docs-per-chunk", "4"]
    for args in (["cache", "validate", str(tiny_cache)], ["cache", "info", str(tiny_cache)], build_args):
        proc = engine(root, *args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error:") and "corrupt" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    engine(root, *build_args, "--force-rebuild")
    assert PackedCache(tiny_cache).manifest_hash() == manifest


def test_one_builder_per_cache(tiny_cache: Path, tiny_corpus: Path, root: Path) -> None:
    from engine.cache.build import build_cache, fill_cache
    from engine.cache.locks import builder_lock
    from engine.config import DataConfig
    from engine.paths import Layout

    data = DataConfig(source=str(tiny_corpus), dataset_name="tiny", tokenizer="bytes", seq_len=32, docs_per_chunk=4)
    with builder_lock(tiny_cache):
        with pytest.raises(UserError, match="another builder is working on cache"):
            build_cache(data, Layout.resolve(root))
        with pytest.raises(UserError, match="another builder is working on cache"):
            fill_cache(tiny_cache)
        with pytest.raises(UserError, match="an unsharded build, fill or repair is running"):
            build_cache(data, Layout.resolve(root), shard=(0, 2))
        assert validate_cache(tiny_cache).building
    assert validate_cache(tiny_cache).ok


WRONG_SHAPES = [
    (lambda m: m.update(seq_len="64"), "seq_len is '64'"),
    (lambda m: m.update(planned_chunks=10**20), "planned_chunks is"),
    (lambda m: m.pop("tokenizer"), "tokenizer is missing"),
    (lambda m: m["tokenizer"].update(dir="../../elsewhere"), "tokenizer dir is '../../elsewhere'"),
    (lambda m: m["source"].update(spec=["a"]), "source spec is ['a']"),
    (lambda m: m["chunks"].__setitem__(0, [1, 2]), "chunk record 0 is not a mapping"),
    (lambda m: m["chunks"][1].update(file="../../../../etc/passwd"), "chunk record 1 names file '../../../../etc/passwd'"),
    (lambda m: m["chunks"][1].pop("n_seqs"), "chunk record 1 has n_seqs None"),
    (lambda m: m["chunks"].__setitem__(2, dict(m["chunks"][0])), "chunk 0 is listed twice"),
    (lambda m: m["chunks"][0]["doc_tokens"].pop("max"), "malformed doc_tokens"),
]


@pytest.mark.parametrize("mutate, problem", WRONG_SHAPES, ids=[p for _, p in WRONG_SHAPES])
def test_metadata_of_the_wrong_shape_is_one_line_everywhere(tiny_cache: Path, root: Path, mutate, problem: str) -> None:
    """Valid JSON, wrong shape: every command names the problem in one line, and a chunk `file` or
    tokenizer `dir` pointing outside the cache is refused before anything reads or cleans by it."""
    meta_file = tiny_cache / "cache_metadata.json"
    meta = json.loads(meta_file.read_text())
    mutate(meta)
    meta_file.write_text(json.dumps(meta))
    before = chunk_files(tiny_cache)
    with pytest.raises(UserError, match="incomplete or corrupt"):
        PackedCache(tiny_cache)
    for args in (["info"], ["validate"], ["validate", "--repair"], ["fill"]):
        proc = engine(root, "cache", *args, str(tiny_cache), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"error: {meta_file} is incomplete or corrupt (") and problem in lines[0]
    assert chunk_files(tiny_cache) == before


def test_a_file_is_not_a_cache_folder(tmp_path: Path, root: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    proc = engine(root, "cache", "info", str(tmp_path / "a_file"), check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: cache {tmp_path / 'a_file'} is a file, not a cache folder\n"


def test_a_dead_registry_writer_leaves_no_temporary(tiny_cache: Path, root: Path) -> None:
    from engine.cache.registry import register_cache
    from engine.paths import Layout

    layout = Layout.resolve(root)
    torn = layout.cache_root / ".tmp-cache_registry.json-0badc0de"
    torn.write_text('{"caches": {')
    register_cache(layout, tiny_cache, load_metadata(tiny_cache))
    assert not torn.exists()
    assert sorted(p.name for p in layout.cache_root.iterdir()) == ["cache_registry.json", "cache_registry.lock",
                                                                   "packed_sequences"]
