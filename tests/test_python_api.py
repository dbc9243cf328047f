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


def test_the_readme_example_trains_saves_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    model = tmp_path / "checkpoints" / "random_rows"
    assert [step for step, _ in checkpoint_dirs(model)][:1] == [40]
    state = load_trainer_state(model / "checkpoint_000040")
    assert (state.run, state.cache.dataset_name, state.cache.sequence_length) == (2, "randomrows", 64)
    assert sorted(step_losses(read_log(tmp_path, "random_rows", 2))) == [30, 40]  # logged every 10 steps


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
