"""The build pool's worker: tokenize one chunk's documents, pack, compress, write the file.

Workers run in a forkserver pool (no inherited tokenizer threads or locks) and encode on one
thread each (W processes on W cores beats W processes x W rayon threads). They watch the
builder and exit when it is gone: forkserver children are not the builder's children, hold its
pipes open themselves and would otherwise wait forever after a kill -9 (and keep the forkserver
alive). A killed build leaves at most a `.tmp-*` or unlisted chunk file, which the next run removes.
The chunk file is renamed into place here; only the builder's metadata commit makes it visible.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache.chunks import Example, Packed, compress, doc_length_summary, np_dtype, pack, pack_examples, write_chunk_file
from engine.cache.metadata import TEXT_FORMAT, chunk_filename
from engine.cache.records import Renderer
from engine.cache.sources import Payload, payload_texts

BUILDER_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs, picklable; fixed for a cache once built."""

    cache_dir: str
    tokenizer_file: str
    seq_len: int
    dtype: str
    eos_id: int
    record_format: str = TEXT_FORMAT  # instruction records are rendered, masked and packed whole


@dataclass
class ChunkTask:
    chunk_id: int
    start: int
    end: int
    payload: Payload
    expect_hash: str | None = None  # a rebuild must reproduce the committed bytes exactly


class ChunkEncoder:
    """Tokenizer + packing for one cache; also used in-process by the benchmark."""

    def __init__(self, spec: BuildSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.dir = Path(spec.cache_dir)
        self.dtype = np_dtype(spec.dtype)
        self.tokenizer = Tokenizer.from_file(spec.tokenizer_file)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.renderer = None if spec.record_format == TEXT_FORMAT else \
            Renderer(spec.record_format, Path(spec.tokenizer_file).parent)
        # "<|endoftext|>" inside a document is text, not EOS; a chat template's own markers are special
        self.tokenizer.encode_special_tokens = self.renderer is None or not self.renderer.templated

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def pack_docs(self, docs: list[Any]) -> tuple[Packed, list[str]]:
        """The chunk's rows (with flags for instruction records) and the texts they were cut from."""
        spec = self.spec
        if self.renderer is None:
            return pack(self.encode(docs), eos_id=spec.eos_id, seq_len=spec.seq_len, dtype=self.dtype), docs
        rendered = [self.renderer.segments(r) for r in docs]
        texts = [text for segments in rendered for text, _ in segments]
        ids = iter(self.encode(texts))
        examples = []
        for segments in rendered:
            ex = Example([], [])
            for (_, trains), seg_ids in zip(segments, ids):
                ex.ids += seg_ids
                ex.trains += [trains] * len(seg_ids)
            examples.append(ex)
        return pack_examples(examples, eos_id=spec.eos_id, seq_len=spec.seq_len, dtype=self.dtype), texts

    def build(self, task: ChunkTask) -> dict[str, Any]:
        """The chunk's metadata record; with `mismatch` set (and nothing written) when a rebuild
        does not reproduce `expect_hash`."""
        packed, texts = self.pack_docs(payload_texts(task.payload))
        data, digest, raw_bytes = compress(packed.rows, packed.flags)
        record = {
            "id": task.chunk_id, "file": chunk_filename(task.chunk_id), "n_seqs": int(packed.rows.shape[0]),
            "tokens": packed.tokens, "dropped": packed.dropped, "docs": [task.start, task.end],
            "raw_bytes": raw_bytes, "compressed_bytes": len(data), "hash": digest,
            "text_bytes": sum(len(t.encode("utf-8", "replace")) for t in texts),
            "doc_tokens": doc_length_summary(packed.doc_lengths), **packed.record_fields(),
        }
        if task.expect_hash is not None and digest != task.expect_hash:
            record["mismatch"] = True
            return record
        write_chunk_file(self.dir, task.chunk_id, data)
        return record


_encoder: ChunkEncoder | None = None


def _builder_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is dead, just not reaped yet
    except OSError:
        return True


def _watch_builder(pid: int) -> None:
    while _builder_alive(pid):
        time.sleep(BUILDER_CHECK_INTERVAL_S)
    os._exit(1)


def init_worker(spec: BuildSpec, builder_pid: int) -> None:
    global _encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the builder's to handle: it commits, then stops us
    threading.Thread(target=_watch_builder, args=(builder_pid,), daemon=True, name="watch-builder").start()
    _encoder = ChunkEncoder(spec)


def build_chunk(task: ChunkTask) -> dict[str, Any]:
    assert _encoder is not None, "init_worker was not called"
    return _encoder.build(task)
