"""The cache CLI: one `error:` line for bad input (touching nothing), --events, --json, listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import corpus_texts, write_txt_corpus
from engine.cache.hub import offline_reason
from engine.protocol import CacheProgress, CacheReady, Error, decode


def engine(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "--root", str(root), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "inputs"
    write_txt_corpus(d / "corpus", corpus_texts(8))
    (d / "empty").mkdir()
    (d / "empty.jsonl").write_text("")
    (d / "wrong_column.jsonl").write_text('{"content": "a document"}\n')
    (d / "numbers.jsonl").write_text('{"text": 5}\n')
    (d / "broken_tokenizer.json").write_text("{not json")
    (d / "a_file").write_text("")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "bad" / "not.parquet").parent.mkdir()
    (d / "bad" / "not.parquet").write_text("not parquet")
    return d


ERRORS = [
    (["--source", "{d}/missing.txt"], "does not exist"),
    (["--source", "./nowhere/data.jsonl"], "does not exist"),
    (["--source", "{d}/*.parquet"], "no files match"),
    (["--source", "someone/unknown-dataset"], "hub is unreachable (HF_HUB_OFFLINE=1) and dataset 'someone/unknown-dataset'"),
    (["--source", "{d}/corpus", "--tokenizer", "someone/unknown-tokenizer"], "hub is unreachable"),
    (["--source", "{d}/empty"], "holds no .txt"),
    (["--source", "{d}/empty.jsonl"], "holds no documents"),
    (["--source", "{d}/wrong_column.jsonl"], "text column 'text' not found in"),
    (["--source", "{d}/numbers.jsonl"], "holds int values, not text"),
    (["--source", "{d}/broken.jsonl"], "Failed to load JSON from file '{d}/broken.jsonl': JSON parse error"),
    (["--source", "{d}/broken.jsonl", "--streaming"], "Failed to load JSON from file '{d}/broken.jsonl': JSON parse"),
    (["--source", "{d}/bad/not.parquet"], "Failed to read schema from '{d}/bad/not.parquet': Parquet magic"),
    (["--source", "{d}/a_file"], "unsupported file type (no extension) in"),
    (["--source", "{d}/corpus", "--seq-len", "1"], "seq_len must be at least 2"),
    (["--source", "{d}/corpus", "--seq-len", "99999999999"], "seq_len 99,999,999,999 is unreasonably large"),
    (["--source", "{d}/corpus", "--tokenizer", "bpe:5000000000"], "does not fit uint32"),
    (["--source", "{d}/corpus", "--tokenizer", "bpe:100"], "at least 257"),
    (["--source", "{d}/corpus", "--tokenizer", "{d}/broken_tokenizer.json"], "cannot load tokenizer"),
    (["--source", "{d}/corpus", "--dataset-name", "../escape"], "invalid dataset name"),
    (["--source", "{d}/corpus", "--cache", "{d}/a_file/cache"], "cannot write to"),
    (["--source", "{d}/corpus", "--cache", "{d}"], "is not empty and is not a packed cache"),
    (["--source", "{d}/corpus", "--cache", "{root}/checkpoints/new"], "/checkpoints, which holds models and logs"),
    (["--source", "{d}/corpus", "--cache", "{root}/training_logs"], "/training_logs, which holds models and logs"),
    (["--source", "{d}/corpus", "--shard", "2/2"], "need 0 <= k < N"),
    (["--source", "{d}/corpus", "--workers", "0"], "--workers must be at least 1"),
    (["--source", "{d}/corpus", "--seq-len", "1048576"], "no sequences: 8 documents gave "),
    (["--source", "{d}/corpus", "--shard", ""], "expected k/N"),
    (["--source", "{d}/corpus", "--split", ""], "split is empty"),
]


@pytest.mark.parametrize("args, message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path: Path, inputs: Path, args: list[str],
                                                        message: str) -> None:
    root = tmp_path / "root"
    before = files_under(inputs)
    proc = engine(root, "cache", "build", "--tokenizer", "bytes",
                  *[a.replace("{d}", str(inputs)).replace("{root}", str(root)) for a in args])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.replace("{d}", str(inputs)) in lines[0], \
        proc.stderr
    assert not root.exists() and files_under(inputs) == before


@pytest.mark.parametrize("action", ["validate", "info", "fill"])
def test_commands_on_a_missing_cache(tmp_path: Path, action: str) -> None:
    proc = engine(tmp_path / "root", "cache", action, str(tmp_path / "nope"))
    assert proc.returncode != 0 and proc.stderr.strip() == f"error: cache {tmp_path / 'nope'} does not exist"
    relative = engine(tmp_path / "root", "cache", action, "64/nope")
    assert relative.returncode == 2 and relative.stderr == (
        f"error: cache 64/nope not found: neither {Path.cwd() / '64/nope'} nor "
        f"{tmp_path / 'root/cache/packed_sequences/64/nope'} exists\n")


def test_unreachable_hub_without_the_offline_switch(tmp_path: Path, inputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_HUB_OFFLINE: the socket probe itself finds the hub unreachable, before any library retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", env["HF_ENDPOINT"])
    assert "cannot connect to 127.0.0.1:9" in (offline_reason() or "")
    proc = engine(tmp_path / "root", "cache", "build", "--source", "roneneldan/TinyStories", env=env)
    assert proc.stderr.startswith("error: the Hugging Face hub is unreachable (cannot connect to 127.0.0.1:9")
    assert "use --source stdlib or a local file" in proc.stderr


def test_events_are_protocol_lines(tmp_path: Path, inputs: Path) -> None:
    root = tmp_path / "root"
    proc = engine(root, "cache", "build", "--source", str(inputs / "corpus"), "--tokenizer", "bpe:260", "--seq-len",
                  "16", "--docs-per-chunk", "2", "--events")
    assert proc.returncode == 0, proc.stderr
    events = [decode(line) for line in proc.stdout.splitlines()]
    progress = [e for e in events if isinstance(e, CacheProgress)]
    assert {e.stage for e in progress} == {"tokenizer", "build"}
    assert progress[-1].chunks_done == progress[-1].chunks_total == 4 and progress[-1].tokens > 0
    assert isinstance(events[-1], CacheReady) and events[-1].chunks == 4 and events[-1].ok
    bad = engine(root, "cache", "build", "--source", str(inputs / "corpus"), "--seq-len", "1", "--events")
    assert isinstance(decode(bad.stdout.strip()), Error) and bad.stderr.startswith("error: seq_len")


def test_validate_info_list_json(tmp_path: Path, inputs: Path) -> None:
    root = tmp_path / "root"
    built = engine(root, "cache", "build", "--source", str(inputs / "corpus"), "--dataset-name", "c", "--tokenizer",
                   "bytes", "--seq-len", "16", "--docs-per-chunk", "2")
    assert built.returncode == 0 and built.stdout.startswith("Cache ready: 4 chunks, ")
    ok = engine(root, "cache", "validate", "16/c")
    n = json.loads(engine(root, "cache", "info", "16/c", "--json").stdout)["sequences"]
    assert ok.returncode == 0 and ok.stdout == f"Cache validated: 4 chunks, {n:,} sequences\n"
    report = json.loads(engine(root, "cache", "validate", "16/c", "--json").stdout)
    assert report["ok"] and report["chunks"] == 4 and report["bad"] == [] and report["pending"] == []
    info = engine(root, "cache", "info", "16/c")
    assert "documents: 8" in info.stdout and "| document tokens |" in info.stdout
    listed = json.loads(engine(root, "cache", "list", "--json").stdout)
    assert [(c["dataset_name"], c["seq_len"], c["chunks"], c["status"]) for c in listed] == [("c", 16, 4, "ok")]
    assert json.loads((root / "cache" / "cache_registry.json").read_text())["caches"]
    assert "c  " in engine(root, "cache", "list").stdout


def test_modules_the_tui_imports_are_light() -> None:
    code = ("import sys, engine.cache.registry, engine.cache.metadata, engine.cache.naming, engine.cache.sources; "
            "print([m for m in ('torch', 'tokenizers', 'datasets', 'transformers', 'numpy') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_a_bpe_vocabulary_smaller_than_asked_is_said(tmp_path: Path, inputs: Path) -> None:
    root = tmp_path / "root"
    proc = engine(root, "cache", "build", "--source", str(inputs / "corpus"), "--tokenizer", "bpe:1024", "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr
    vocab = json.loads(engine(root, "cache", "info", str(root / "cache/packed_sequences/16/corpus"), "--json").stdout)
    assert proc.stderr == (f"warning: tokenizer bpe:1024: the source has too little text for 1,024 tokens; the trained "
                           f"vocabulary has {vocab['vocab_size']:,}\n") and vocab["vocab_size"] < 1024
    events = engine(tmp_path / "other", "cache", "build", "--source", str(inputs / "corpus"), "--tokenizer", "bpe:1024",
                    "--seq-len", "16", "--events")
    assert any(e["event"] == "warning" and "1,024 tokens" in e["message"] for e in map(json.loads, events.stdout.splitlines()))
