"""The Python API (`from engine import Trainer`): the README's example runs as written, a run from a
packed cache resumes exactly through the API, and bad datasets are one UserError line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Trainer, protocol
from engine.catalog import checkpoint_dirs
from engine.errors import UserError
from engine.state import load_trainer_state
from train_support import REPO, build_cache_in_process, read_log, step_losses

pytestmark = pytest.mark.slow


def readme_example() -> str:
    section = (REPO / "README.md").read_text(encoding="utf-8").split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_example_trains_saves_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from engine import cli

    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    model = tmp_path / "checkpoints" / "random_rows"
    assert [step for step, _ in checkpoint_dirs(model)][:1] == [40]
    state = load_trainer_state(model / "checkpoint_000040")
    assert (state.run, state.cache.dataset_name, state.cache.sequence_length) == (2, "randomrows", 64)
    assert sorted(step_losses(read_log(tmp_path, "random_rows", 2))) == [30, 40]  # logged every 10 steps
    capsys.readouterr()
    assert cli.main(["generate", "random_rows", "--prompt", "hi", "--device", "cpu"]) == 2  # rows without tokenizer=
    err = capsys.readouterr().err
    assert err.startswith("error: no tokenizer in ") and "give Trainer tokenizer=" in err and err.count("\n") == 1


class Rows:
    """A map-style dataset without torch: lists of ids."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


def test_a_cache_run_resumed_through_the_api_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    cache = build_cache_in_process(tmp_path)
    settings: dict[str, Any] = dict(model="tiny", root=tmp_path, quiet=True, micro_batch=4, grad_accum=2, lr=3e-3,
                                    seed=7, warmup_steps=3, precision="fp32", device="cpu", log_interval=1)
    whole = Trainer(cache, name="whole", max_steps=6, **settings)
    assert whole.train().step == 6
    events: list[protocol.Event] = []
    part = Trainer(cache, name="part", max_steps=3, on_event=events.append, **settings)
    first = part.train()
    assert (first.reason, first.checkpoint) == ("completed", "part_checkpoint_3_run_1")
    assert [e.step for e in events if isinstance(e, protocol.Step)] == [1, 2, 3]
    assert part.resume(max_steps=6).checkpoint == "part_checkpoint_6_run_2"
    expected = step_losses(read_log(tmp_path, "whole", 1))
    assert step_losses(read_log(tmp_path, "part", 2)) == {k: expected[k] for k in (4, 5, 6)}


@pytest.mark.parametrize("rows, vocab, message", [
    ([[1, 2, 3, 4]] * 8, None, "needs vocab_size="),
    ([[1, 2, 3, 4]] * 7 + [[1, 2, 3]], 10, "dataset item 7 has 3 ids, item 0 has 4"),
    ([[1, 2, 3, 4]] * 7 + [[1, 2, 3, 99]], 10, "dataset item 7 holds id 99, outside the vocabulary of 10"),
    ([[[1, 2], [3, 4]]] * 8, 10, "dataset item 0 is not a 1-D sequence of token ids"),
    ([[1, 2, 3, 4]], 10, "the dataset has 1 row"),
])
def test_a_bad_dataset_is_one_line_and_writes_no_cache(tmp_path: Path, rows: list, vocab: int | None,
                                                       message: str) -> None:
    trainer = Trainer(Rows(rows), model="tiny", name="bad", root=tmp_path, vocab_size=vocab, max_steps=1)
    with pytest.raises(UserError, match=re.escape(message)):
        trainer.train()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


def test_unknown_settings_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown"):
        Trainer(tmp_path, model="tiny", root=tmp_path, micro_batches=4)


def test_the_same_rows_reuse_their_cache_and_other_rows_under_its_name_are_refused(tmp_path: Path) -> None:
    from engine.cache.rows import write_rows_cache
    from engine.cache.validate import validate_cache
    from engine.paths import Layout

    layout = Layout.resolve(tmp_path)
    rows = np.arange(10 * 17).reshape(10, 17) % 50
    path = write_rows_cache(Rows(rows.tolist()), layout, "ids", vocab_size=50)
    report = validate_cache(path)
    assert (report.ok, report.n_chunks, report.n_sequences) == (True, 5, 10)  # `cache validate` passes it
    stamp = (path / "cache_metadata.json").stat().st_mtime_ns
    assert write_rows_cache(Rows(rows.tolist()), layout, "ids", vocab_size=50) == path
    assert (path / "cache_metadata.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds other rows"):
        write_rows_cache(Rows((rows[::-1]).tolist()), layout, "ids", vocab_size=50)


# --- tokenizer=: the tokenizer the rows' ids came from --------------------------------------------

TEXT = "the cat sat on the mat while the dog ran far away. "


def encoded_rows(tokenizer_dir: Path, n: int = 16, length: int = 17) -> Rows:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(TEXT * 40)["input_ids"]
    return Rows([ids[i * 3:i * 3 + length] for i in range(n)])


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, protocol.Finished]:
    """(root, tokenizer folder, how the run ended): `tiny` trained a few steps on rows of ids that a
    local tokenizer folder made (a hub tokenizer's format), passed as tokenizer=."""
    from tests.use_support import hf_tokenizer_folder

    root = tmp_path_factory.mktemp("tokenized")
    folder = hf_tokenizer_folder(root / "tokenizer_in", chat_template=False)
    finished = Trainer(encoded_rows(folder), model="tiny", name="worded", root=root, tokenizer=str(folder), quiet=True,
                       micro_batch=4, lr=3e-3, max_steps=3, precision="fp32", device="cpu").train()
    return root, folder, finished


def test_a_model_trained_on_rows_with_their_tokenizer_generates_text_and_exports_the_tokenizer(
        tokenized: tuple[Path, Path, protocol.Finished], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    from engine import cli, generate, inference
    from engine.cache.metadata import load_metadata
    from engine.paths import Layout

    root, folder, finished = tokenized
    original = AutoTokenizer.from_pretrained(str(folder))
    meta = load_metadata(root / "cache" / "packed_sequences" / "16" / "rows")
    assert meta["tokenizer"]["spec"] == str(folder.resolve()) and meta["tokenizer"]["kind"] == "hf"
    assert (meta["vocab_size"], meta["eos_id"]) == (max(original.get_vocab().values()) + 1, original.eos_token_id)
    loaded = inference.load(Layout.resolve(root), finished.checkpoint, device="cpu", precision="fp32")
    assert loaded.tokenizer.get_vocab() == original.get_vocab() and loaded.eos_id == original.eos_token_id
    prompt = generate.encode(loaded, "the cat")
    assert prompt == original("the cat")["input_ids"]
    params = protocol.SamplingParams(max_new_tokens=6, temperature=0)
    done = generate.run(loaded, prompt, params, emit=lambda e: None)[0]
    assert done.ids and done.text == original.decode(done.ids, skip_special_tokens=True)
    monkeypatch.setenv("PACKTRAIN_HOME", str(root))
    assert cli.main(["generate", finished.checkpoint, "--prompt", "the cat", "--temperature", "0",
                     "--max-new-tokens", "6", "--device", "cpu", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out == done.text + "\n"  # what `packtrain-engine generate` prints
    assert cli.main(["checkpoints", "export", finished.checkpoint, str(tmp_path / "hf")]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported(TEXT)["input_ids"] == original(TEXT)["input_ids"] and exported.eos_token == "</s>"


def held_tokenizer(kind: str, folder: Path) -> Any:
    """The tokenizer of `folder` in each form tokenizer= takes."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    return {"folder": str(folder), "file": folder / "tokenizer.json", "transformers": AutoTokenizer.from_pretrained(
        str(folder)), "tokenizers": Tokenizer.from_file(str(folder / "tokenizer.json"))}[kind]


@pytest.mark.parametrize("kind", ["folder", "file", "transformers", "tokenizers"])
def test_each_form_of_tokenizer_is_kept_as_cache_build_keeps_it_and_reuses_its_cache(tmp_path: Path, kind: str) -> None:
    from engine.cache.metadata import load_metadata
    from engine.cache.rows import write_rows_cache
    from engine.cache.tokenizer import parse_tokenizer_spec, same_tokenizer
    from engine.cache.validate import validate_cache
    from engine.paths import Layout
    from tests.use_support import hf_tokenizer_folder

    folder = hf_tokenizer_folder(tmp_path / "tok", chat_template=False)
    rows, layout, given = encoded_rows(folder), Layout.resolve(tmp_path), held_tokenizer(kind, folder)
    path = write_rows_cache(rows, layout, "words", tokenizer=given)
    meta = load_metadata(path)
    record = meta["tokenizer"]
    assert validate_cache(path).ok and same_tokenizer(path / "tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    assert (meta["eos_id"], record["eos_token"], record["kind"]) == (0, "</s>", "hf")  # "</s>" is id 0 here
    own = str(path / "tokenizer") if kind in ("transformers", "tokenizers") else str(given)
    assert parse_tokenizer_spec(record["spec"]).spec == str(Path(own).resolve())  # a spec --tokenizer takes
    stamp = (path / "cache_metadata.json").stat().st_mtime_ns
    assert write_rows_cache(rows, layout, "words", tokenizer=held_tokenizer(kind, folder)) == path
    assert (path / "cache_metadata.json").stat().st_mtime_ns == stamp


def test_an_explicit_eos_id_is_the_saved_tokenizers_end_of_text_and_the_callers_object_stays(tmp_path: Path) -> None:
    import json

    from transformers import AutoTokenizer

    from engine.cache.rows import write_rows_cache
    from engine.paths import Layout
    from tests.use_support import hf_tokenizer_folder

    folder = hf_tokenizer_folder(tmp_path / "tok", chat_template=False)
    held = AutoTokenizer.from_pretrained(str(folder))
    settings: dict[str, Any] = dict(tokenizer=held, eos_id=5, vocab_size=512)
    path = write_rows_cache(encoded_rows(folder), Layout.resolve(tmp_path), "words", **settings)
    saved = json.loads((path / "cache_metadata.json").read_text())
    assert (saved["eos_id"], saved["vocab_size"]) == (5, 512)
    assert saved["tokenizer"]["eos_token"] == held.convert_ids_to_tokens(5) != "</s>"
    assert AutoTokenizer.from_pretrained(str(path / "tokenizer")).eos_token_id == 5 and held.eos_token == "</s>"
    assert write_rows_cache(encoded_rows(folder), Layout.resolve(tmp_path), "words", **settings) == path


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("first, second, message", [
    ("hf", "bytes", "holds this dataset with tokenizer '{folder}', not with the tokenizer given"),
    (None, "hf", "holds this dataset with no tokenizer, not with the tokenizer given"),
    ("hf", None, "holds this dataset with tokenizer '{folder}', not with the tokenizer given"),
])
def test_the_same_rows_with_another_tokenizer_under_one_name_are_refused_and_change_nothing(
        tmp_path: Path, first: str | None, second: str | None, message: str) -> None:
    from tests.use_support import hf_tokenizer_folder

    folder = hf_tokenizer_folder(tmp_path / "tok", chat_template=False).resolve()
    spec = {"hf": str(folder), "bytes": "bytes", None: None}
    rows = Rows([[(i * 7 + j) % 250 for j in range(17)] for i in range(16)])  # ids both tokenizers hold
    settings: dict[str, Any] = dict(model="tiny", name="refused", root=tmp_path, vocab_size=512, eos_id=0,
                                    dataset_name="same", max_steps=1)
    Trainer(rows, tokenizer=spec[first], **settings).cache_path()
    before = tree(tmp_path)
    with pytest.raises(UserError, match=re.escape(message.format(folder=folder))) as refused:
        Trainer(rows, tokenizer=spec[second], **settings).train()
    assert "\n" not in str(refused.value) and tree(tmp_path) == before


@pytest.mark.parametrize("data, settings, message", [
    ("rows", dict(vocab_size=100), "has 305 tokens, more than the vocab_size of 100"),
    ("rows", dict(tokenizer="bpe:300"), "rows of ids have none: give the tokenizer the ids came from"),
    ("rows", dict(tokenizer="bytes", eos_id=300, vocab_size=512), "eos_id 300 is outside the vocabulary of tokenizer"),
    ("rows", dict(tokenizer="bytes", eos_id=-1, vocab_size=512), "eos_id -1 is outside the vocabulary of tokenizer"),
    ("rows", dict(tokenizer="bytes", eos_id=2 ** 40, vocab_size=512), "is outside the vocabulary of tokenizer"),
    ("rows", dict(tokenizer=42), "tokenizer= takes a tokenizer folder, a tokenizer.json, a hub name, bytes"),
    ("rows", dict(tokenizer="bytes"), "dataset item 0 holds id 300, outside the vocabulary of 257"),
    ("cache", dict(), "tokenizer= is for a dataset of token rows"),
])
def test_a_tokenizer_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path: Path, data: str,
                                                                     settings: dict[str, Any], message: str) -> None:
    from tests.use_support import hf_tokenizer_folder

    folder = hf_tokenizer_folder(tmp_path / "tok", chat_template=False)
    settings = {"tokenizer": str(folder), **settings}
    rows = Rows([[300, *range(16)]] * 8) if settings["tokenizer"] == "bytes" and "eos_id" not in settings \
        else encoded_rows(folder)
    before = tree(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        Trainer(rows if data == "rows" else tmp_path, model="tiny", name="bad", root=tmp_path, max_steps=1,
                **settings).train()
    assert "\n" not in str(refused.value) and tree(tmp_path) == before
