"""Instruction caches: format detection, what trains, whole-example packing, refusals, the v1 layout,
and fill/repair/growth with the flags plane."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.cache.build import build_cache, fill_cache
from engine.cache.chunks import Example, pack_examples
from engine.cache.metadata import load_metadata, metadata_path
from engine.cache.reader import PackedCache
from engine.cache.records import detect_format
from engine.cache.validate import validate_cache
from engine.config import DataConfig
from engine.errors import UserError
from engine.paths import Layout
from engine.token_flags import START, TRAIN

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _prompt_response(n: int) -> list[dict]:
    return [{"prompt": f"Q{i} what is {i} plus {i}? ", "response": f"it is {2 * i}."} for i in range(n)]


def _chat_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer with ChatML markers and a chat template, saved as a model's folder would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from engine.cache.tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _build(root: Path, source: Path, **kw: object) -> Path:
    data = DataConfig(source=str(source), tokenizer=str(kw.pop("tokenizer", "bytes")), seq_len=int(kw.pop("seq_len", 64)),
                      docs_per_chunk=int(kw.pop("docs_per_chunk", 8)), **kw)  # type: ignore[arg-type]
    return build_cache(data, Layout.resolve(root), workers=1)


def _trained_text(rows: np.ndarray, flags: np.ndarray, tokenizer: object) -> list[str]:
    """The trained tokens of every row, decoded per contiguous run."""
    out = []
    for row, f in zip(rows, flags):
        trains = (f & TRAIN).astype(bool)
        runs = np.split(np.arange(len(row)), np.flatnonzero(np.diff(trains.astype(int))) + 1)
        out += [tokenizer.decode(row[r].tolist(), skip_special_tokens=False)  # type: ignore[attr-defined]
                for r in runs if trains[r[0]]]
    return out


def test_formats_are_detected_from_the_columns() -> None:
    assert detect_format(["messages", "text"]) == "chat"
    assert detect_format(["prompt", "response", "id"]) == "prompt_response"
    assert detect_format(["instruction", "input", "output"]) == "instruction"
    assert detect_format(["instruction", "output"]) == "instruction"
    assert detect_format(["text", "prompt"]) == "text"


def test_alpaca_without_a_template_and_prompt_response_through_one(tmp_path: Path) -> None:
    from engine.cache.records import Renderer

    plain = tmp_path / "plain"
    plain.mkdir()
    alpaca = Renderer("instruction", plain).segments({"instruction": "Add", "input": "2 2", "output": "4"})
    assert alpaca == [("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd"
                       "\n\n### Input:\n2 2\n\n### Response:\n", False), ("4", True)]
    chat = Renderer("prompt_response", _chat_tokenizer(tmp_path / "tok")).segments({"prompt": "hi", "response": "yo"})
    assert chat == [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("yo<|im_end|>\n", True)]


def test_examples_pack_whole_first_fit_with_padding_that_never_trains() -> None:
    examples = [Example([1, 2, 3], [False, True, True]), Example([4, 5, 6, 7], [False, False, True, True]),
                Example(list(range(8, 20)), [False] * 6 + [True] * 6), Example([20, 21], [False, False])]
    packed = pack_examples(examples, eos_id=0, seq_len=7, dtype=np.dtype("<u2"))
    # the last example fits the first row's tail; the long one is cut to a row of its own
    assert packed.rows.tolist() == [[1, 2, 3, 0, 20, 21, 0, 0], [4, 5, 6, 7, 0, 0, 0, 0], list(range(8, 16))]
    assert packed.flags[0].tolist() == [START, TRAIN, TRAIN, TRAIN, START, 0, 0, 0]  # a response's EOS trains
    assert packed.flags[1].tolist() == [START, 0, TRAIN, TRAIN, TRAIN, 0, 0, 0]
    assert (packed.padding, packed.truncated, packed.dropped) == (4, 1, 5)


def test_prompt_response_trains_only_the_response(root: Path, tmp_path: Path) -> None:
    path = _build(root, _jsonl(tmp_path / "pr.jsonl", _prompt_response(40)))
    cache = PackedCache(path)
    assert (cache.record_format, cache.flagged) == ("prompt_response", True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(cache.tokenizer_dir / "tokenizer.json"))
    trained = [t for c in cache.chunk_ids for t in _trained_text(cache.read_chunk(c), cache.read_flags(c), tok)]
    assert sorted(trained) == sorted(f"it is {2 * i}.<|endoftext|>" for i in range(40))
    starts = sum(int(np.count_nonzero(cache.read_flags(c) & START)) for c in cache.chunk_ids)
    assert starts == 40  # every example whole, none cut by a row boundary
    stats = json.loads((path / "stats.json").read_text())
    assert stats["format"] == "prompt_response" and stats["examples"] == 40
    assert 0 < stats["trained_share"] < 0.5


def test_chat_records_train_the_assistant_turns(tmp_path: Path) -> None:
    """The worker's encoder in-process (a pool run is what the prompt/response test covers)."""
    from tokenizers import Tokenizer

    from engine.cache.worker import BuildSpec, ChunkEncoder

    records = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                             {"role": "assistant", "content": f"hello {i}"}, {"role": "user", "content": "more"},
                             {"role": "assistant", "content": f"bye {i}"}]} for i in range(12)]
    folder = _chat_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    spec = BuildSpec(str(tmp_path), str(folder / "tokenizer.json"), 128, "uint16", tok.token_to_id("<|endoftext|>"),
                     "chat")
    packed, _ = ChunkEncoder(spec).pack_docs(records)
    # ChatML markers are special tokens (one id each), and only assistant text (with its end marker) trains
    assert tok.token_to_id("<|im_start|>") in packed.rows
    assert sorted(_trained_text(packed.rows, packed.flags, tok)) == sorted(
        t for i in range(12) for t in (f"hello {i}<|im_end|>\n", f"bye {i}<|im_end|>\n<|endoftext|>"))


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "a", "response": 3}], "record 1 of .*'response' must be text"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "record 1 of .*no assistant message"),
    ([{"messages": [{"role": "robot", "content": "a"}]}], "record 1 of .*each message needs a role"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "need a tokenizer with a chat template"),
])
def test_bad_instruction_records_are_refused_before_anything_is_written(root: Path, tmp_path: Path,
                                                                        records: list[dict], message: str) -> None:
    good = [{"prompt": "p", "response": "r"}] if "prompt" in records[0] else \
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    source = _jsonl(tmp_path / "bad.jsonl", good + records)
    with pytest.raises(UserError, match=message) as e:
        _build(root, source)
    assert "\n" not in str(e.value)
    assert not (root / "cache").exists() or not any((root / "cache").rglob("*.lz4"))


def test_v1_text_cache_still_reads_as_text(tiny_cache: Path) -> None:
    meta = json.loads(metadata_path(tiny_cache).read_text())
    assert meta["format_version"] == 2 and meta["source"].get("format", "text") == "text"
    rows = PackedCache(tiny_cache).read_chunk(0).copy()
    meta["format_version"] = 1
    meta["source"].pop("format", None)
    metadata_path(tiny_cache).write_text(json.dumps(meta))
    old = PackedCache(tiny_cache)
    assert (old.record_format, old.flagged, old.read_flags(0)) == ("text", False, None)
    assert np.array_equal(old.read_chunk(0), rows)
    meta["source"]["format"] = "chat"  # a v1 cache cannot hold instruction chunks
    metadata_path(tiny_cache).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="source format is 'chat'"):
        load_metadata(tiny_cache)


def test_fill_repair_and_growth_keep_the_flags(root: Path, tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "pr.jsonl", _prompt_response(48))
    path = _build(root, source, max_docs=24)
    first = {c["id"]: c["hash"] for c in load_metadata(path)["chunks"]}
    assert len(first) == 3
    path = _build(root, source)  # growth appends; what was built stays byte for byte
    grown = {c["id"]: c["hash"] for c in load_metadata(path)["chunks"]}
    assert len(grown) == 6 and all(grown[k] == h for k, h in first.items())
    before = PackedCache(path)
    flags = {c: before.read_flags(c).copy() for c in before.chunk_ids}
    (path / "packed_chunk_000001.lz4").unlink()
    data = bytearray((path / "packed_chunk_000004.lz4").read_bytes())
    data[-9] ^= 0xFF
    (path / "packed_chunk_000004.lz4").write_bytes(bytes(data))
    report = validate_cache(path)
    assert sorted(k for k, _ in report.bad) == [1, 4]
    assert validate_cache(path, repair=True).ok
    (path / "packed_chunk_000002.lz4").unlink()
    assert fill_cache(path, workers=1) == [2]
    after = PackedCache(path)
    assert {c["id"]: c["hash"] for c in after.meta["chunks"]} == grown
    assert all(np.array_equal(after.read_flags(c), flags[c]) for c in after.chunk_ids)
