"""Document sources: the fixed, ordered document stream a cache is cut from.

Chunk k holds documents [k*D, (k+1)*D) of this stream, so its order must never change: file
lists are sorted by relative path, records keep the order `datasets` gives them. The stream's
identity (file list with sizes and mtimes, or the hub name/subset/split/column) is hashed into
the metadata so a rerun can refuse a source that changed under a half-built cache.

`stdlib` is every .py file under sysconfig's stdlib path, sorted, without site-packages,
dist-packages, __pycache__ and test folders (test/, tests/, idle_test/): ~12 MB of real code on
every machine, offline. Its hash uses sizes only, so a reinstall of the same Python matches.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cache.hub import prepare_hub_access, unreachable
from engine.cache.metadata import TEXT_FORMAT
from engine.cache.naming import RECORD_BUILDERS, TEXT_SUFFIXES, is_hub_name
from engine.cache.records import check_record, detect_format, format_columns, record_text
from engine.config import DataConfig
from engine.errors import UserError

SUPPORTED = ", ".join((*TEXT_SUFFIXES, *RECORD_BUILDERS))
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
OFFLINE_ALTERNATIVE = f"--source stdlib or a local file, folder or glob ({SUPPORTED})"

HEAD_DOCS_FOR_CHUNKING = 256
MIN_CHUNK_TEXT_BYTES = 256 << 10
MAX_CHUNK_TEXT_BYTES = 8 << 20
UNKNOWN_SIZE_CHUNK_TEXT_BYTES = 4 << 20


def read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


@dataclass
class FileList:
    """A chunk's documents as file paths: the worker reads them, so text never crosses a pipe."""

    paths: list[str]

    def texts(self) -> list[str]:
        return [read_text_file(p) for p in self.paths]


Payload = list[str] | list[dict[str, Any]] | FileList  # texts, instruction records, or files


def payload_texts(payload: Payload) -> list[Any]:
    return payload.texts() if isinstance(payload, FileList) else payload


@dataclass
class ChunkDocs:
    chunk_id: int
    start: int
    end: int
    payload: Payload


@dataclass
class Source(ABC):
    spec: str  # resolved: absolute path for local sources, the name otherwise
    kind: str  # stdlib | files | records | hub
    n_docs: int | None  # None while a streaming source has not been read to its end
    total_bytes: int | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def record_format(self) -> str:
        """`text`, or the instruction format found in the records (engine.cache.records)."""
        return str(self.options.get("format", TEXT_FORMAT))

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, **self.options, "hash": self.fingerprint(), "n_docs": self.n_docs}

    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the ordered document stream, recorded as the metadata's source hash."""

    @abstractmethod
    def iter_texts(self) -> Iterator[str]:
        """Every document in stream order."""

    @abstractmethod
    def chunks(self, docs_per_chunk: int, wanted: Callable[[int], bool], limit: int | None) -> Iterator[ChunkDocs]:
        """The wanted chunk ids below `limit` (None: until the source ends), in order."""

    def head(self, *, max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
        """The first documents: the tokenizer's training sample and the chunk-size estimate."""
        out: list[str] = []
        chars = 0
        for text in self.iter_texts():
            out.append(text)
            chars += len(text)
            if (max_docs is not None and len(out) >= max_docs) or (max_chars is not None and chars >= max_chars):
                break
        return out

    def default_docs_per_chunk(self) -> int:
        """About total/32 of text per chunk (256 KiB .. 8 MiB): the stdlib sample gives ~3 dozen
        chunks, a 10B-token corpus a few thousand. Fixed in the metadata once chosen."""
        sample = self.head(max_docs=HEAD_DOCS_FOR_CHUNKING)
        mean = max(1.0, sum(len(t.encode("utf-8", "replace")) for t in sample) / max(1, len(sample)))
        if self.total_bytes is None:
            target = UNKNOWN_SIZE_CHUNK_TEXT_BYTES
        else:
            target = min(MAX_CHUNK_TEXT_BYTES, max(MIN_CHUNK_TEXT_BYTES, self.total_bytes / 32))
        return max(1, round(target / mean))


def _ranges(n_docs: int, docs_per_chunk: int, wanted: Callable[[int], bool], limit: int | None) -> Iterator[tuple[int, int, int]]:
    n_chunks = math.ceil(n_docs / docs_per_chunk)
    for k in range(n_chunks if limit is None else min(limit, n_chunks)):
        if wanted(k):
            yield k, k * docs_per_chunk, min((k + 1) * docs_per_chunk, n_docs)


@dataclass
class FileSource(Source):
    """One document per .txt/.md/.py file."""

    paths: list[str] = field(default_factory=list)
    fingerprint_parts: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join([self.kind, *self.fingerprint_parts]).encode()).hexdigest()

    def iter_texts(self) -> Iterator[str]:
        return map(read_text_file, self.paths)

    def chunks(self, docs_per_chunk: int, wanted: Callable[[int], bool], limit: int | None) -> Iterator[ChunkDocs]:
        for k, start, end in _ranges(len(self.paths), docs_per_chunk, wanted, limit):
            yield ChunkDocs(k, start, end, FileList(self.paths[start:end]))


@dataclass
class DatasetSource(Source):
    """Records from `datasets`: a map-style Dataset (random access) or a streaming IterableDataset."""

    dataset: Any = None
    text_column: str = "text"
    files_fingerprint: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        o = self.options
        parts = [self.kind, self.spec, str(o.get("subset")), str(o.get("split")), self.text_column, *self.files_fingerprint]
        if self.record_format != TEXT_FORMAT:  # text sources keep the hash they had before formats existed
            parts.append(self.record_format)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _texts(self, values: list[Any]) -> list[str]:
        for v in values:
            if v is not None and not isinstance(v, str):
                raise UserError(f"column {self.text_column!r} of {self.spec} holds {type(v).__name__} values, not text; "
                                "choose another --text-column")
        return [v or "" for v in values]

    def _docs(self, batch: Mapping[str, list[Any]], start: int) -> list[Any]:
        """A batch of columns as documents: texts, or checked instruction records (one error line
        naming the first bad record)."""
        fmt = self.record_format
        if fmt == TEXT_FORMAT:
            return self._texts(batch[self.text_column])
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return [check_record(r, fmt, f"record {start + i} of {self.spec}") for i, r in enumerate(rows)]

    def _iter_docs(self) -> Iterator[Any]:
        start = 0
        with dataset_errors(self.spec):
            for batch in self.dataset.iter(batch_size=1024):
                docs = self._docs(batch, start)
                start += len(docs)
                yield from docs

    def iter_texts(self) -> Iterator[str]:
        docs = self._iter_docs()
        return docs if self.record_format == TEXT_FORMAT else map(record_text, docs)

    def chunks(self, docs_per_chunk: int, wanted: Callable[[int], bool], limit: int | None) -> Iterator[ChunkDocs]:
        if self.n_docs is not None and not self.options.get("streaming"):
            for k, start, end in _ranges(self.n_docs, docs_per_chunk, wanted, limit):
                with dataset_errors(self.spec):
                    docs = self._docs(self.dataset[start:end], start)
                yield ChunkDocs(k, start, end, docs)
            return
        yield from self._stream_chunks(docs_per_chunk, wanted, limit)

    def _stream_chunks(self, docs_per_chunk: int, wanted: Callable[[int], bool], limit: int | None) -> Iterator[ChunkDocs]:
        """Read in order; unwanted chunks are skipped without tokenizing. Reaching the end fixes n_docs."""
        k, count, buf = 0, 0, []
        for text in self._iter_docs():
            k = count // docs_per_chunk
            if limit is not None and k >= limit:
                return
            count += 1
            if wanted(k):
                buf.append(text)
                if len(buf) == docs_per_chunk:
                    yield ChunkDocs(k, k * docs_per_chunk, count, buf)
                    buf = []
        self.n_docs = count
        if buf:
            yield ChunkDocs(k, k * docs_per_chunk, count, buf)


# --- resolving a spec ----------------------------------------------------------------------------


def open_source(data: DataConfig) -> Source:
    """Resolve and check a source without writing anything; bad input is one UserError line."""
    spec = (data.source or "").strip()
    if not spec:
        raise UserError("no source given: use --source stdlib, a local file/folder/glob or a hub dataset name")
    if spec == "stdlib":
        source: Source = _stdlib_source()
    elif os.path.exists(os.path.expanduser(spec)) or glob.has_magic(spec):
        source = _local_source(spec, data)
    elif not is_hub_name(spec):
        raise UserError(f"source {spec!r} does not exist (give stdlib, a local file/folder/glob or a hub dataset name)")
    else:
        source = _hub_source(spec, data)
    if source.n_docs == 0 or source.total_bytes == 0:
        raise UserError(f"source {spec!r} holds no documents")
    return source


def _stdlib_source() -> FileSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    paths.sort(key=lambda p: Path(p).relative_to(root).as_posix())
    sizes = [os.path.getsize(p) for p in paths]
    parts = [f"python {sys.version_info.major}.{sys.version_info.minor}"]
    parts += [f"{Path(p).relative_to(root).as_posix()}\t{s}" for p, s in zip(paths, sizes)]
    return FileSource(spec="stdlib", kind="stdlib", n_docs=len(paths), total_bytes=sum(sizes),
                      paths=paths, fingerprint_parts=parts)


def _collect_files(spec: str) -> tuple[list[Path], Path]:
    """The files a path, folder or glob names (sorted), and the root their names are relative to."""
    expanded = os.path.expanduser(spec)
    if glob.has_magic(expanded):
        found = [Path(p).resolve() for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not found:
            raise UserError(f"no files match {spec!r}")
        root = Path(os.path.commonpath([str(p.parent) for p in found]))
    elif os.path.isdir(expanded):
        root = Path(expanded).resolve()
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            found += [Path(dirpath, f) for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in (*TEXT_SUFFIXES, *RECORD_BUILDERS)]
        if not found:
            raise UserError(f"folder {spec!r} holds no {SUPPORTED} files")
    else:
        found = [Path(expanded).resolve()]
        root = found[0].parent
    return sorted(found, key=lambda p: p.relative_to(root).as_posix()), root


def _local_source(spec: str, data: DataConfig) -> Source:
    files, root = _collect_files(spec)
    suffixes = {p.suffix.lower() for p in files}
    unsupported = suffixes - set(TEXT_SUFFIXES) - set(RECORD_BUILDERS)
    if unsupported:
        kinds = ", ".join(s or "(no extension)" for s in sorted(unsupported))
        raise UserError(f"unsupported file type {kinds} in {spec!r} (supported: {SUPPORTED})")
    builders = {RECORD_BUILDERS[s] for s in suffixes if s in RECORD_BUILDERS}
    if builders and (len(builders) > 1 or suffixes & set(TEXT_SUFFIXES)):
        raise UserError(f"{spec!r} mixes file types ({', '.join(sorted(suffixes))}); point --source at one kind")
    stats = [p.stat() for p in files]
    parts = [f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in zip(files, stats)]
    expanded = os.path.expanduser(spec)
    resolved = os.path.abspath(expanded) if glob.has_magic(spec) else str(Path(expanded).resolve())
    if not builders:
        return FileSource(spec=resolved, kind="files", n_docs=len(files), total_bytes=sum(st.st_size for st in stats),
                          paths=[str(p) for p in files], fingerprint_parts=parts)
    if not sum(st.st_size for st in stats):
        raise UserError(f"source {spec!r} holds no documents")
    builder = builders.pop()
    options = {"text_column": data.text_column, "streaming": bool(data.streaming)}
    ds = _load_dataset(spec, builder, data_files=[str(p) for p in files], split="train", streaming=data.streaming)
    return _dataset_source(ds, resolved, "records", options, data.text_column, parts)


def _hub_source(name: str, data: DataConfig) -> Source:
    reason = prepare_hub_access()
    options = {"subset": data.subset, "split": data.split, "text_column": data.text_column,
               "streaming": bool(data.streaming)}
    try:
        ds = _load_dataset(name, name, name=data.subset, split=data.split, streaming=data.streaming)
    except UserError:
        if reason is not None:
            raise unreachable("dataset", name, reason, OFFLINE_ALTERNATIVE) from None
        raise
    return _dataset_source(ds, name, "hub", options, data.text_column, [])


def _load_dataset(spec: str, path: str, **kwargs: Any) -> Any:
    import datasets

    with dataset_errors(spec):
        return datasets.load_dataset(path, **kwargs)


@contextmanager
def dataset_errors(spec: str) -> Iterator[None]:
    """One error line for a file `datasets` cannot read, at load time or (streaming) mid-build.

    The library reports a bad file twice: an ERROR log line on stderr, which names the file, and an
    exception whose message is often generic ("An error occurred while generating the dataset").
    The log line is captured instead of printed and becomes the reason."""
    import logging

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    captured: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: captured.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("datasets")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the library raises many kinds; the user needs one line
        raise UserError(f"cannot load dataset {spec!r}: {_dataset_error_reason(e, captured)}") from None
    finally:
        logger.handlers, logger.propagate = saved


def _dataset_error_reason(e: BaseException, logged: list[str]) -> str:
    if logged:  # "Failed to load JSON from file 'x.jsonl' with error <class '...ArrowInvalid'>: JSON parse error ..."
        text = re.sub(r" with error (?:<class '[\w.]+'>|\w+): ", ": ", logged[-1])
    else:
        if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
            e = e.__cause__
        text = str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


def _dataset_source(ds: Any, spec: str, kind: str, options: dict[str, Any], column: str, files: list[str]) -> DatasetSource:
    streaming = bool(options.get("streaming"))
    columns = ds.column_names
    if columns is None:  # a streaming dataset learns its columns from the first record
        with dataset_errors(spec):
            first = next(iter(ds), None)
        if first is None:
            raise UserError(f"source {spec!r} holds no documents")
        columns = list(first)
    fmt = detect_format(columns)
    if fmt == TEXT_FORMAT and column not in columns:
        raise UserError(f"text column {column!r} not found in {spec!r}; available: {', '.join(columns)} "
                        "(set --text-column, or give instruction records: messages, prompt/response or "
                        "instruction/input/output)")
    options = {**options, "format": fmt}
    ds = ds.select_columns(format_columns(fmt, columns, column))
    n_docs = None if streaming else len(ds)
    total = None if streaming else int(ds.data.nbytes)
    source = DatasetSource(spec=spec, kind=kind, n_docs=n_docs, total_bytes=total, options=options, dataset=ds,
                           text_column=column, files_fingerprint=files)
    if streaming and not source.head(max_docs=1):
        raise UserError(f"source {spec!r} holds no documents")
    if fmt != TEXT_FORMAT and not streaming:
        for _ in source._iter_docs():  # every record checked now: a bad one refuses the build before it starts
            pass
    return source
