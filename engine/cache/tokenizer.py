"""Tokenizers for a cache: `bytes`, `bpe:<vocab>` (trained on the source) or any HF tokenizer.

Whatever the kind, the cache keeps its own copy in `<cache>/tokenizer/` (tokenizer.json plus
tokenizer_config.json), loadable by `AutoTokenizer.from_pretrained`, so checkpoints can copy it
and the cache never depends on a hub or a file that may change. Its sha256 (of tokenizer.json,
the file workers encode with) goes into the metadata. `bytes` and `bpe` need no transformers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.atomic import TMP_PREFIX, fsync_dir
from engine.cache.hub import prepare_hub_access, unreachable
from engine.cache.metadata import IDS_FILE, TOKENIZER_DIR, dtype_name_for_vocab
from engine.cache.naming import is_hub_name
from engine.cache.records import named_special_tokens
from engine.cache.sources import Source
from engine.errors import UserError

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
BPE_SAMPLE_CHARS = 8_000_000  # the training sample: the first documents up to ~8 MB (~2 s on 2 cores)
TOKENIZER_FILE = "tokenizer.json"
OFFLINE_TOKENIZERS = "--tokenizer bytes, bpe:<vocab> or a local folder/tokenizer.json"


@dataclass(frozen=True)
class TokenizerPlan:
    spec: str
    kind: Literal["bytes", "bpe", "hf"]
    bpe_vocab: int = 0


@dataclass
class PreparedTokenizer:
    plan: TokenizerPlan
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token: str
    eos_id: int
    vocab_size: int
    hf: Any = None  # the transformers tokenizer to save_pretrained (kind 'hf')


def parse_tokenizer_spec(spec: str) -> TokenizerPlan:
    """Check a spec before anything is loaded or written."""
    spec = (spec or "").strip()
    if spec == "bytes":
        return TokenizerPlan(spec, "bytes")
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:].replace("_", "").replace(",", ""))
        except ValueError:
            raise UserError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:8192") from None
        if vocab < 257:
            raise UserError(f"tokenizer {spec!r}: a byte-level BPE needs at least 257 tokens (256 bytes + EOS)")
        dtype_name_for_vocab(vocab)
        return TokenizerPlan(spec, "bpe", vocab)
    if not spec:
        raise UserError("no tokenizer given: use bytes, bpe:<vocab>, a hub name, a folder or a tokenizer.json")
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        return TokenizerPlan(str(Path(local).resolve()), "hf")
    if not is_hub_name(spec):
        raise UserError(f"tokenizer {spec!r} does not exist (give bytes, bpe:<vocab>, a hub name, a folder or a "
                        "tokenizer.json)")
    return TokenizerPlan(spec, "hf")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, the alphabet of ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(model: Any) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_tokenizer() -> Any:
    from tokenizers import models

    chars = bytes_to_unicode()
    tok = _byte_level(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _train_bpe(vocab: int, source: Source) -> Any:
    """Deterministic: the same source head and vocab give the same tokenizer.json."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(source.head(max_chars=BPE_SAMPLE_CHARS), trainer=trainer)
    return tok


def check_hub_tokenizer(plan: TokenizerPlan) -> None:
    """Fail before any work when a hub tokenizer can be neither downloaded nor found in the HF cache."""
    if plan.kind != "hf" or os.path.exists(os.path.expanduser(plan.spec)):
        return
    reason = prepare_hub_access()
    if reason is None:
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(plan.spec, f), str) for f in (TOKENIZER_FILE, "tokenizer_config.json")):
        raise unreachable("tokenizer", plan.spec, reason, OFFLINE_TOKENIZERS)


def _load_hf(spec: str) -> Any:
    """A transformers fast tokenizer from a tokenizer.json, a local folder or a hub name."""
    path = Path(os.path.expanduser(spec))
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        if path.is_dir() and (path / TOKENIZER_FILE).is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path / TOKENIZER_FILE))
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load tokenizer {spec!r}: {first}") from None


def prepare_tokenizer(plan: TokenizerPlan, source: Source) -> PreparedTokenizer:
    """Load or train in memory; nothing is written, so a refused tokenizer leaves no trace."""
    hf = None
    if plan.kind == "bytes":
        tok, eos = _bytes_tokenizer(), EOS_TOKEN
    elif plan.kind == "bpe":
        tok, eos = _train_bpe(plan.bpe_vocab, source), EOS_TOKEN
    else:
        hf = _load_hf(plan.spec)
        tok, eos = _fast(hf, repr(plan.spec)), _eos_token(hf)
        if eos is None:
            raise UserError(f"tokenizer {plan.spec!r} has no end-of-text token (looked for eos_token and "
                            f"{', '.join(EOS_CANDIDATES)})")
    return _prepared(plan, tok, eos, hf)


def _fast(hf: Any, label: str) -> Any:
    if not getattr(hf, "is_fast", False):
        raise UserError(f"tokenizer {label} has no fast (tokenizers) version")
    return hf.backend_tokenizer


def _eos_token(hf: Any) -> str | None:
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    return hf.eos_token if hf.eos_token in vocab else next((t for t in EOS_CANDIDATES if t in vocab), None)


def _prepared(plan: TokenizerPlan, tok: Any, eos: str, hf: Any) -> PreparedTokenizer:
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dtype_name_for_vocab(vocab_size)
    return PreparedTokenizer(plan, tok, eos, tok.token_to_id(eos), vocab_size, hf)


def prepare_rows_tokenizer(given: Any, eos_id: int | None) -> PreparedTokenizer:
    """The tokenizer rows of token ids came from (engine.cache.rows): what `--tokenizer` takes, except
    bpe:<vocab>, which trains on text the rows do not have, or a tokenizers.Tokenizer or transformers
    fast tokenizer already in memory (spec `python:<class>` until the cache names its own copy). An
    explicit `eos_id` wins over the tokenizer's end-of-text token, and the saved copy names it, so
    generation stops where training learned to."""
    if isinstance(given, (str, Path)):
        plan = parse_tokenizer_spec(str(given))
        if plan.kind == "bpe":
            raise UserError(f"tokenizer {plan.spec!r} is trained on text and rows of ids have none: give the "
                            "tokenizer the ids came from (a folder, a tokenizer.json, a hub name or bytes)")
        check_hub_tokenizer(plan)
        hf = _load_hf(plan.spec) if plan.kind == "hf" else None
    else:
        plan, hf = TokenizerPlan(f"python:{type(given).__name__}", "hf"), _held_hf(given)
    label = repr(plan.spec)
    tok = _bytes_tokenizer() if hf is None else _fast(hf, label)
    known = isinstance(eos_id, int) and not isinstance(eos_id, bool) and \
        0 <= eos_id < tok.get_vocab_size(with_added_tokens=True)
    eos = (EOS_TOKEN if hf is None else _eos_token(hf)) if eos_id is None else tok.id_to_token(eos_id) if known else None
    if eos is None and eos_id is None:
        raise UserError(f"tokenizer {label} has no end-of-text token (looked for eos_token and "
                        f"{', '.join(EOS_CANDIDATES)}): give eos_id=")
    if eos is None:
        raise UserError(f"eos_id {eos_id} is outside the vocabulary of tokenizer {label}")
    if hf is not None and hf.eos_token != eos and eos_id is not None:
        hf = copy.deepcopy(hf)  # the caller's tokenizer stays as it was
        hf.eos_token = eos
        tok = hf.backend_tokenizer  # what is saved, and what a second call compares with
    return _prepared(plan, tok, eos, hf)


def _held_hf(given: Any) -> Any:
    """A tokenizer object as transformers saves it: a tokenizers.Tokenizer is wrapped (its
    end-of-text token, if it has one, named), a transformers tokenizer taken as it is."""
    from tokenizers import Tokenizer

    if isinstance(given, Tokenizer):
        from transformers import PreTrainedTokenizerFast

        vocab = given.get_vocab(with_added_tokens=True)
        return PreTrainedTokenizerFast(tokenizer_object=given,
                                       eos_token=next((t for t in EOS_CANDIDATES if t in vocab), None))
    if hasattr(given, "backend_tokenizer") or hasattr(given, "is_fast"):
        return given
    raise UserError(f"tokenizer= takes a tokenizer folder, a tokenizer.json, a hub name, bytes, a tokenizers.Tokenizer "
                    f"or a transformers tokenizer; got {type(given).__name__}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_tokenizer(cache_dir: Path, prepared: PreparedTokenizer) -> str:
    """Write `<cache>/tokenizer/` as a whole (tmp folder, fsync, rename); returns its sha256."""
    target = cache_dir / TOKENIZER_DIR
    tmp = cache_dir / f"{TMP_PREFIX}{TOKENIZER_DIR}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if prepared.hf is not None:
            prepared.hf.save_pretrained(str(tmp))
        else:
            prepared.tokenizer.save(str(tmp / TOKENIZER_FILE))
            specials = {"eos_token": prepared.eos_token, "pad_token": prepared.eos_token}
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "model_max_length": 1 << 30, **specials}
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(cache_dir)
    return file_sha256(target / TOKENIZER_FILE)


def tokenizer_file(cache_dir: Path, meta: dict[str, Any]) -> Path:
    """The file the cache's tokenizer hash covers: tokenizer.json, or ids.json for rows of ids."""
    record = meta.get("tokenizer") or {}
    return cache_dir / record.get("dir", TOKENIZER_DIR) / (IDS_FILE if record.get("kind") == "ids" else TOKENIZER_FILE)


def special_token_ids(tokenizer_dir: Path, eos_id: int) -> dict[str, int]:
    """bos/eos/pad ids for a model trained on a cache. EOS is the cache's own (the id packed between
    documents); BOS and PAD are the ones the tokenizer's config names when it has them, else EOS too:
    every packed document starts right after an EOS, as GPT-2's do, and padding never trains."""
    tokens = {k: v for k, v in named_special_tokens(tokenizer_dir).items() if k in ("bos_token", "pad_token")}
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if tokens:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
        except Exception:  # noqa: BLE001 - tokenizers raises plain Exception; EOS alone is still right
            return ids
        for key, token in tokens.items():
            found = tok.token_to_id(token)
            if found is not None:
                ids[f"{key}_id"] = found
    return ids


def check_cache_tokenizer(cache_dir: Path, meta: dict[str, Any]) -> str | None:
    """None when the cache's tokenizer file is the one its chunks were built with, else why not."""
    path = tokenizer_file(cache_dir, meta)
    if not path.is_file():
        return f"tokenizer file {path.relative_to(cache_dir)} is missing"
    if file_sha256(path) != (meta.get("tokenizer") or {}).get("sha256"):
        return f"tokenizer file {path.relative_to(cache_dir)} differs from the one the chunks were built with"
    return None


ID_KEYS = ("normalizer", "pre_tokenizer", "model", "added_tokens", "decoder")


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files map text to the same ids (and ids back to the same text).
    Saving a tokenizer again can rewrite parts that play no role here (a post-processor that only adds
    special tokens on request), so identical bytes are enough but not needed."""
    if file_sha256(a) == file_sha256(b):
        return True
    try:
        return _same_ids(json.loads(a.read_text(encoding="utf-8")), json.loads(b.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def holds_tokenizer(path: Path, tokenizer: Any) -> bool:
    """same_tokenizer for a tokenizer.json on disk and a tokenizers.Tokenizer in memory."""
    try:
        return _same_ids(json.loads(path.read_text(encoding="utf-8")), json.loads(tokenizer.to_str()))
    except (OSError, ValueError):
        return False


def _same_ids(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return all(first.get(k) == second.get(k) for k in ID_KEYS)
