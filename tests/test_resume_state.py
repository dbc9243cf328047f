"""A resume refuses a bad trainer_state.json or run.json in one line before it writes anything; a
save that fails on a full disk is one line; saved and exported configs carry the tokenizer's ids.

One tiny run is trained once per module (in-process, through engine.cli.main) and copied per case.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import catalog, cli
from engine.manifest import MANIFEST, hash_file, verify
from engine.paths import Layout
from tests.train_support import build_tiny_cache, data_flags, train_flags, write_corpus

pytestmark = pytest.mark.slow

MODEL = "m"
CHECKPOINT = Path("checkpoints") / MODEL / "checkpoint_000002"
STATE = CHECKPOINT / "trainer_state.json"
RUN_JSON = Path("checkpoints") / MODEL / "run.json"


def engine(root: Path, *args: str) -> tuple[int, str, str]:
    """engine.cli.main in this process (no torch import per case), with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    home = os.environ.get("PACKTRAIN_HOME")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["--root", str(root), *args])
    finally:
        if home is None:
            os.environ.pop("PACKTRAIN_HOME", None)
        else:
            os.environ["PACKTRAIN_HOME"] = home
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 steps with one checkpoint (step 2) on a byte-level cache."""
    root = tmp_path_factory.mktemp("state") / "root"
    root.mkdir()
    corpus = write_corpus(root, n_docs=120)
    build_tiny_cache(root, corpus)
    rc, _, err = engine(root, "train", "--name", MODEL, *data_flags(corpus), *train_flags(max_steps=2, save_interval=2))
    assert rc == 0, err
    assert sorted(p.name for p in (root / CHECKPOINT).parent.glob("checkpoint_*")) == [CHECKPOINT.name]
    return root


@contextlib.contextmanager
def copy_of(trained: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        shutil.copytree(trained, root, symlinks=True)
        yield root


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def write_state(root: Path, state: Any) -> None:
    """Replace trainer_state.json and re-hash it in the MANIFEST, so the checkpoint stays intact."""
    path = root / STATE
    path.write_text(json.dumps(state), encoding="utf-8")
    manifest = json.loads((root / CHECKPOINT / MANIFEST).read_text())
    manifest[path.name] = {"bytes": path.stat().st_size, "hash": hash_file(path)}
    (root / CHECKPOINT / MANIFEST).write_text(json.dumps(manifest))
    assert verify(root / CHECKPOINT) is None


def assert_refused(root: Path, before: dict[str, str], rc: int, err: str) -> str:
    assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (rc, err)
    assert tree(root) == before, "a refused resume wrote or deleted something"
    return err


def nested_set(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.mark.parametrize(("path", "value", "field"), [
    (("plan",), [1], "plan"), (("step",), "3", "step"), (("cache",), [], "cache"), (("data",), 5, "data"),
    (("rng",), "x", "rng"), (("optimizer", "param_groups"), "x", "optimizer.param_groups"),
    (("global_batch",), 8.0, "global_batch"), (("plan", "schedule"), [], "plan.schedule"),
    (("growth_events",), {}, "growth_events"), (("cursor",), -5, "cursor"), (("rng", "numpy", 2), 10 ** 6, "rng.numpy"),
    (("rng", "torch"), [1, 2, 3], "rng"), (("plan", "schedule", "warmup_steps"), -1, "plan.schedule.warmup_steps"),
    (("cursor",), 10 ** 9, "cursor"), (("loss",), "low", "loss"),
])
def test_a_state_of_the_wrong_shape_is_one_line_naming_the_field_and_writes_nothing(
        trained: Path, path: tuple, value: Any, field: str) -> None:
    """The fields the fault run reported: each gave a TypeError, ValueError, AttributeError or
    KeyError, `cursor: -5` was accepted, and `rng: "x"` failed after run.json and a run log were written."""
    with copy_of(trained) as root:
        state = json.loads((root / STATE).read_text())
        nested_set(state, path, value)
        write_state(root, state)
        before = tree(root)
        rc, _, err = engine(root, "resume", f"{MODEL}_checkpoint_2_run_1", "--max-steps", "3")
        assert str(STATE) in assert_refused(root, before, rc, err) and f"field '{field}" in err, err


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(runs="x"), "field 'runs' must be a list"),
    (lambda d: d["runs"][0].update(run="1"), "field 'runs[0].run' must be an integer"),
    (lambda d: d["runs"][0].pop("start_step"), "field 'runs[0].start_step' is missing"),
    (lambda d: d.update(format="packtrain.run/9"), "field 'format' must be 'packtrain.run/1'"),
    (lambda d: d.pop("config"), "field 'config' is missing"),
])
def test_a_run_json_of_the_wrong_shape_is_one_line_and_writes_nothing(trained: Path, mutate: Any, message: str) -> None:
    with copy_of(trained) as root:
        data = json.loads((root / RUN_JSON).read_text())
        mutate(data)
        (root / RUN_JSON).write_text(json.dumps(data))
        before = tree(root)
        rc, _, err = engine(root, "resume", MODEL, "--max-steps", "3")
        assert message in assert_refused(root, before, rc, err)


def test_by_model_name_a_bad_state_is_skipped_like_a_torn_checkpoint(trained: Path) -> None:
    """The list calls it invalid, so resume must not pick it as the newest valid checkpoint either."""
    with copy_of(trained) as root:
        state = json.loads((root / STATE).read_text())
        state["epoch"] = "zero"
        write_state(root, state)
        (entry,) = catalog.list_checkpoints(Layout.resolve(root))
        assert not entry.valid and entry.reason == "trainer_state.json: field 'epoch' must be an integer, got 'zero'"
        before = tree(root)
        rc, out, err = engine(root, "resume", MODEL, "--max-steps", "3")
        assert "no valid checkpoint of 'm'" in assert_refused(root, before, rc, err)
        assert "field 'epoch' must be an integer" in err


def test_run_json_records_its_format_and_an_older_one_without_it_still_resumes(trained: Path) -> None:
    with copy_of(trained) as root:
        data = json.loads((root / RUN_JSON).read_text())
        assert data["format"] == "packtrain.run/1"
        del data["format"]
        (root / RUN_JSON).write_text(json.dumps(data))
        rc, _, err = engine(root, "resume", MODEL, "--max-steps", "3")
        assert rc == 0, err
        runs = json.loads((root / RUN_JSON).read_text())["runs"]
        assert [r["run"] for r in runs] == [1, 2] and runs[1]["resumed_from"] == "m_checkpoint_2_run_1"


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports ENOSPC as SafetensorError, which is not an OSError."""
    from safetensors import SafetensorError

    import engine.backends.torch_backend as torch_backend

    def full_disk(*_: Any, **__: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with copy_of(trained) as root:
        monkeypatch.setattr(torch_backend, "save_file", full_disk)
        rc, _, err = engine(root, "resume", MODEL, "--max-steps", "3")
        assert rc == 1 and err.startswith("error: cannot save checkpoint_000003") and err.count("\n") == 1, err
        assert "No space left on device" in err and "Traceback" not in err
        model_dir = root / CHECKPOINT.parent
        assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(("checkpoint_", ".tmp-"))) == \
            [CHECKPOINT.name]
        assert verify(root / CHECKPOINT) is None and (model_dir / "latest").read_text().strip() == CHECKPOINT.name


def special_ids(folder: Path) -> list[tuple[Any, ...]]:
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    return [tuple(d.get(f"{k}_token_id") for k in ("bos", "eos", "pad")) for d in (config, generation)]


def test_saved_and_exported_configs_carry_the_tokenizers_eos_for_bytes(trained: Path, tmp_path: Path) -> None:
    """LlamaConfig's defaults (bos 1, eos 2) belong to another tokenizer; `bytes` packs EOS 256."""
    assert special_ids(trained / CHECKPOINT) == [(256, 256, 256)] * 2
    rc, _, err = engine(trained, "checkpoints", "export", f"{MODEL}_checkpoint_2_run_1", str(tmp_path / "hf"))
    assert rc == 0, err
    assert special_ids(tmp_path / "hf") == [(256, 256, 256)] * 2


def test_saved_and_exported_configs_carry_the_tokenizers_eos_for_bpe(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    corpus = write_corpus(root, n_docs=120)
    flags = [*data_flags(corpus), "--tokenizer", "bpe:300", "--dataset-name", "bpe"]
    rc, _, err = engine(root, "train", "--name", "b", *flags, *train_flags(max_steps=1))
    assert rc == 0, err
    meta = json.loads((root / "cache" / "packed_sequences" / "32" / "bpe" / "cache_metadata.json").read_text())
    assert meta["eos_id"] == 0  # the BPE trainer's first special token
    assert special_ids(root / "checkpoints" / "b" / "checkpoint_000001") == [(0, 0, 0)] * 2
    rc, _, err = engine(root, "checkpoints", "export", "b_checkpoint_1_run_1", str(tmp_path / "hf"))
    assert rc == 0, err
    assert special_ids(tmp_path / "hf") == [(0, 0, 0)] * 2


# --- property: any hash-consistent mutation is refused in one line, or resumes ------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON document, with long lists (RNG states, parameter names) sampled at their ends."""
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = [(i, value[i]) for i in sorted({0, len(value) - 1}) if value]
    else:
        return
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


@st.composite
def mutations(draw: st.DrawFn, trained_state: dict, run_json: dict) -> tuple[str, Any]:
    """(file, new document): one field replaced by any JSON value, negated, deleted, or a key added."""
    file = draw(st.sampled_from([str(STATE)] * 3 + [str(RUN_JSON)]))
    doc = json.loads(json.dumps(trained_state if file == str(STATE) else run_json))
    choices = [p for p in paths(doc) if p[0] != "config"]  # run.json's config is engine.config's to check
    path = draw(st.sampled_from(choices))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    op = draw(st.sampled_from(["replace", "negate", "delete", "add"]))
    if op == "negate" and isinstance(old, (int, float)) and not isinstance(old, bool) and old:
        parent[path[-1]] = -old
    elif op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "add" and isinstance(old, dict):
        old[draw(st.text(min_size=1, max_size=6))] = draw(JSON)
    else:
        parent[path[-1]] = draw(JSON)
    return file, doc


def test_mutated_states_and_run_json_are_refused_in_one_line_or_resume(trained: Path) -> None:
    state = json.loads((trained / STATE).read_text())
    run_json = json.loads((trained / RUN_JSON).read_text())

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(state, run_json))
    def check(mutation: tuple[str, Any]) -> None:
        file, doc = mutation
        with copy_of(trained) as root:
            if file == str(STATE):
                write_state(root, doc)
            else:
                (root / file).write_text(json.dumps(doc))
            before = tree(root)
            rc, _, err = engine(root, "resume", f"{MODEL}_checkpoint_2_run_1", "--max-steps", "3")
            if rc != 0:
                assert_refused(root, before, rc, err)
                return
            assert "Traceback" not in err
            saved = json.loads((root / CHECKPOINT.parent / "checkpoint_000003" / "trainer_state.json").read_text())
            assert saved["step"] == 3 and verify(root / CHECKPOINT.parent / "checkpoint_000003") is None
            assert math.isfinite(saved["saved_at"])

    check()
