"""Shared fixtures. Tests run offline with a private, empty Hugging Face home, so no hub name can
resolve from a developer's cache and nothing is written to ~/.cache."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="packtrain-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=_HF_HOME, HF_DATASETS_CACHE=os.path.join(_HF_HOME, "datasets"))

WORDS = ("the model reads packed tokens from small chunks while a cache grows under it and every "
         "write is atomic so nothing torn is ever seen def return class import yield lambda").split()


def corpus_texts(n_docs: int, *, seed: int = 0, max_words: int = 120) -> list[str]:
    """Deterministic documents of varied length (some empty), with unicode and newlines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n = 0 if i % 17 == 5 else rng.randint(1, max_words)
        words = [rng.choice(WORDS) for _ in range(n)]
        if i % 7 == 3:
            words.append("héllo — ünïcode ✓\n\tindent")
        docs.append(" ".join(words))
    return docs


def write_txt_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc_{i:05d}.txt").write_text(t, encoding="utf-8")
    return folder


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty packtrain root, also set as PACKTRAIN_HOME."""
    r = tmp_path / "root"
    r.mkdir()
    monkeypatch.setenv("PACKTRAIN_HOME", str(r))
    return r


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """60 .txt documents (one per file)."""
    return write_txt_corpus(tmp_path / "corpus", corpus_texts(60))


@pytest.fixture
def tiny_cache(root: Path, tiny_corpus: Path) -> Path:
    """A 15-chunk byte-level cache (seq_len 32, 4 docs per chunk) in `root`."""
    from engine.cache.build import build_cache
    from engine.config import DataConfig
    from engine.paths import Layout

    data = DataConfig(source=str(tiny_corpus), dataset_name="tiny", tokenizer="bytes", seq_len=32, docs_per_chunk=4)
    return build_cache(data, Layout.resolve(root), workers=2)
