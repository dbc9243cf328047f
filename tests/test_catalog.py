"""engine.catalog: cheap, torch-free listings of checkpoints and runs, including torn and live ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import catalog, manifest, protocol
from engine.checkpoint import MODEL_FILE, Checkpointer
from engine.manifest import MANIFEST, hash_file
from engine.state import TRAINER_STATE
from engine.control import EngineLock
from engine.paths import Layout
from test_checkpoint import of, trained_once, trainer_state

HEAVY = ("torch", "transformers", "tokenizers", "datasets", "safetensors")


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.resolve(tmp_path).ensure()


@pytest.fixture
def saved(layout: Layout) -> Layout:
    """Model `alpha` with steps 1..3 (step 3 torn by truncation) and model `beta` with step 10."""
    model, opt = trained_once()
    alpha = Checkpointer(layout, "alpha", keep_last=3)
    for step in (1, 2, 3):
        alpha.save(step=step, backend=of(model, opt), trainer_state=trainer_state(step), eval_loss=0.5 * step)
    with open(alpha.dir / "checkpoint_000003" / MODEL_FILE, "r+b") as f:
        f.truncate(100)
    Checkpointer(layout, "beta").save(step=10, backend=of(model), optimizer=False, trainer_state=trainer_state(10, run=2))
    return layout


def test_list_checkpoints_fields_validity_and_order(saved: Layout) -> None:
    entries = catalog.list_checkpoints(saved)
    assert [e.display_name for e in entries] == [
        "beta_checkpoint_10_run_2", "alpha_checkpoint_3_run_1", "alpha_checkpoint_2_run_1", "alpha_checkpoint_1_run_1"]
    beta, torn, two = entries[0], entries[1], entries[2]
    assert (beta.model, beta.step, beta.run, beta.is_latest, beta.valid, beta.running) == ("beta", 10, 2, True, True, False)
    assert (beta.dataset, beta.sequences, beta.loss, beta.saved_at) == ("stdlib", 1234, 3.0, 1_700_000_010.0)
    assert beta.size_bytes == sum(p.stat().st_size for p in Path(beta.path).iterdir())
    assert not torn.valid and torn.is_latest and torn.reason.startswith("model.safetensors is 100 bytes")
    assert two.valid and not two.is_latest and two.eval_loss == 1.0 and two.reason is None
    assert json.loads(json.dumps([e.to_dict() for e in entries]))[0]["display_name"] == "beta_checkpoint_10_run_2"
    assert [e.step for e in catalog.list_checkpoints(saved, "alpha")] == [3, 2, 1]


def test_listing_reports_missing_manifest_and_state(saved: Layout) -> None:
    two = saved.checkpoint_dir("alpha", 2)
    (two / "MANIFEST.json").unlink()
    one = saved.checkpoint_dir("alpha", 1)
    (one / "trainer_state.json").write_text("{not json")
    by_step = {e.step: e for e in catalog.list_checkpoints(saved, "alpha")}
    assert by_step[2].reason == "MANIFEST.json is missing (save did not finish)"
    assert not by_step[1].valid and "trainer_state.json" in by_step[1].reason
    assert by_step[1].display_name == "alpha_checkpoint_1_run_0" and by_step[1].run is None


def test_temporaries_and_stray_names_are_not_listed(saved: Layout) -> None:
    model_dir = saved.model_dir("alpha")
    (model_dir / ".tmp-checkpoint_000004-deadbeef").mkdir()
    (model_dir / "notes").mkdir()
    (saved.checkpoints_root / ".hidden").mkdir()
    os.symlink(model_dir / "checkpoint_000001", model_dir / "checkpoint_000099")
    assert [e.step for e in catalog.list_checkpoints(saved)] == [10, 3, 2, 1]


def test_a_flipped_byte_lists_as_invalid_even_when_latest(saved: Layout) -> None:
    """Same size, so only a hash sees it; resume would skip it, so the list must not offer it."""
    path = saved.checkpoint_dir("beta", 10) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    beta = catalog.list_checkpoints(saved, "beta")[0]
    assert beta.is_latest and not beta.valid and beta.reason == "model.safetensors is corrupt (hash mismatch)"


def test_a_state_of_the_wrong_shape_lists_as_invalid_with_the_field(saved: Layout) -> None:
    path = saved.checkpoint_dir("beta", 10)
    state = json.loads((path / TRAINER_STATE).read_text())
    state["plan"] = [1]
    (path / TRAINER_STATE).write_text(json.dumps(state))
    manifest = json.loads((path / MANIFEST).read_text())  # re-hashed: intact files, a bad state
    manifest[TRAINER_STATE] = {"bytes": (path / TRAINER_STATE).stat().st_size, "hash": hash_file(path / TRAINER_STATE)}
    (path / MANIFEST).write_text(json.dumps(manifest))
    beta = catalog.list_checkpoints(saved, "beta")[0]
    assert not beta.valid and beta.reason == "trainer_state.json: field 'plan' must be an object, got [1]"
    assert (beta.step, beta.run, beta.loss) == (10, 2, 3.0)  # what can be shown still is


def test_listing_hashes_each_file_once_until_it_changes(saved: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verdicts are kept in memory and in checkpoints/<model>/.verified.json (outside every checkpoint
    folder, whose MANIFEST must stay exact), keyed by each file's size and mtime_ns."""
    hashed: list[str] = []
    real = manifest.hash_file
    monkeypatch.setattr(manifest, "hash_file", lambda p, **kw: hashed.append(Path(p).name) or real(p, **kw))
    catalog.list_checkpoints(saved)
    assert hashed == []  # the saver hashed every file as it wrote it and recorded the verdict
    monkeypatch.setattr(manifest, "_memory", {})  # a new process: the TUI, or the next `checkpoints list`
    catalog.list_checkpoints(saved)
    assert hashed == []
    verdicts = saved.verdicts("alpha")
    assert verdicts.parent == saved.model_dir("alpha") and verdicts.is_file()
    for step in (1, 2):
        folder = saved.checkpoint_dir("alpha", step)
        assert sorted(os.listdir(folder)) == sorted([*json.loads((folder / MANIFEST).read_text()), MANIFEST])

    verdicts.unlink()
    monkeypatch.setattr(manifest, "_memory", {})
    catalog.list_checkpoints(saved)
    files = len(json.loads((saved.checkpoint_dir("alpha", 1) / MANIFEST).read_text()))
    assert len(hashed) == 2 * files  # alpha's steps 1 and 2 (step 3 is torn by size; beta kept its file)
    hashed.clear()
    monkeypatch.setattr(manifest, "_memory", {})
    catalog.list_checkpoints(saved)
    assert hashed == []  # the verdicts came back from the file

    touched = saved.checkpoint_dir("alpha", 2) / "config.json"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    catalog.list_checkpoints(saved)
    assert len(hashed) == files  # that checkpoint again, no other


def test_a_symlinked_model_folder_is_not_listed(saved: Layout, tmp_path: Path) -> None:
    """delete and export refuse checkpoints that resolve outside checkpoints/, so the list does not
    offer them (nor, pointed inside, list one model twice)."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(saved.model_dir("beta"), outside / "gamma")
    os.symlink(outside / "gamma", saved.checkpoints_root / "gamma")
    os.symlink(saved.model_dir("alpha"), saved.checkpoints_root / "alias")
    assert {e.model for e in catalog.list_checkpoints(saved)} == {"alpha", "beta"}


def test_running_flag_follows_a_live_engine(saved: Layout) -> None:
    with EngineLock(saved, "alpha").acquire(run=2, log=saved.run_log("alpha", 2)):
        running = {e.model: e.running for e in catalog.list_checkpoints(saved)}
        assert running == {"alpha": True, "beta": False}
        assert [e.model for e in catalog.live_engines(saved)] == ["alpha"]
    assert not any(e.running for e in catalog.list_checkpoints(saved))


def write_log(layout: Layout, model: str, run: int, events: list[protocol.Event], tail: str = "") -> Path:
    path = layout.run_log(model, run)
    path.write_text("".join(protocol.encode(e) + "\n" for e in events) + tail)
    return path


def steps(first: int, last: int, total: int) -> list[protocol.Step]:
    return [protocol.Step(step=s, total_steps=total, loss=10.0 / s, lr=1e-3, grad_norm=1.0, tokens_per_sec=1e4,
                          eta_s=1.0, progress_pct=100 * s / total, rss_gb=1.0) for s in range(first, last + 1)]


def test_list_runs_finished_killed_and_live(layout: Layout) -> None:
    header = dict(total_steps=100, config={"name": "alpha"})
    write_log(layout, "alpha", 1, [protocol.RunStarted(model="alpha", run=1, ts=100.0, **header), *steps(1, 50, 100),
                                   protocol.Finished(step=50, reason="stopped")])
    # killed mid-append: no finished event, a torn last line, more steps than the tail window
    many = steps(51, 6000, 120)
    write_log(layout, "alpha", 2, [protocol.RunStarted(model="alpha", run=2, ts=200.0, start_step=50,
                                                       resumed_from="alpha_checkpoint_50_run_1", **header),
                                   protocol.Plan(total_steps=120, warmup_steps=5, n_sequences=10, global_batch=2,
                                                 tokens_per_step=32), *many], tail='{"v":1,"event":"st')
    assert layout.run_log("alpha", 2).stat().st_size > catalog.TAIL_BYTES
    live_log = write_log(layout, "beta", 1, [protocol.RunStarted(model="beta", run=1, ts=300.0, total_steps=7)])
    with EngineLock(layout, "beta").acquire(run=1, log=live_log):
        runs = catalog.list_runs(layout)
    assert [(r.model, r.run) for r in runs] == [("beta", 1), ("alpha", 2), ("alpha", 1)]
    live, killed, stopped = runs
    assert (live.live, live.pid, live.finished, live.last_step, live.total_steps) == (True, os.getpid(), None, 0, 7)
    assert (killed.live, killed.finished, killed.last_step, killed.total_steps) == (False, None, 6000, 120)
    assert killed.last_loss == pytest.approx(10.0 / 6000) and killed.resumed_from == "alpha_checkpoint_50_run_1"
    assert (stopped.finished, stopped.last_step, stopped.started, stopped.live) == ("stopped", 50, 100.0, False)


def test_list_runs_reads_logs_of_the_wrong_shape_as_unknowns(layout: Layout) -> None:
    """Hand-edited or foreign logs: a header naming '..' or a run 'x', string steps, a number as the
    finish reason. The list still comes back, with the file name's model and run and unknown values."""
    layout.logs_root.mkdir(parents=True, exist_ok=True)
    (layout.logs_root / "m_run_3.jsonl").write_text(
        '{"event": "run", "model": "..", "run": "x", "ts": "now", "start_step": "a", "resumed_from": 7}\n'
        '{"event": "step", "step": "s", "total_steps": [1], "loss": "low"}\n{"event": "finished", "reason": 5}\n')
    (layout.logs_root / "n_run_2.jsonl").write_bytes(b"\xff\xfe not json\n[1, 2]\n")
    runs = {r.model: r for r in catalog.list_runs(layout)}
    m, n = runs["m"], runs["n"]
    assert (m.run, m.started, m.last_step, m.total_steps, m.last_loss, m.finished, m.resumed_from) == \
        (3, None, None, None, None, None, None)
    assert (n.run, n.last_step, n.live) == (2, None, False)


def test_read_run_splits_events_for_plots(layout: Layout) -> None:
    path = write_log(layout, "alpha", 1, [
        protocol.RunStarted(model="alpha", run=1, total_steps=4), *steps(1, 4, 4),
        protocol.Eval(step=4, loss=2.0, perplexity=7.39),
        protocol.CheckpointSaved(step=4, path="p", display_name="alpha_checkpoint_4_run_1"),
        protocol.Finished(step=4, reason="completed"),
    ], tail='{"torn')
    run = catalog.read_run(path)
    assert run["header"]["model"] == "alpha" and [s["step"] for s in run["steps"]] == [1, 2, 3, 4]
    assert run["evals"][0]["loss"] == 2.0 and run["checkpoints"][0]["step"] == 4
    assert run["finished"]["reason"] == "completed"
    assert run["offset"] == path.stat().st_size - len('{"torn')


def test_empty_root_lists_nothing(tmp_path: Path) -> None:
    layout = Layout.resolve(tmp_path / "nothing")
    assert catalog.list_checkpoints(layout) == [] and catalog.list_runs(layout) == []
    assert catalog.list_caches(layout) == [] and catalog.live_engines(layout) == []


def test_catalog_never_imports_the_training_stack(saved: Layout) -> None:
    code = (
        "import sys; from engine import catalog; from engine.paths import Layout; "
        f"layout = Layout.resolve({str(saved.root)!r}); "
        "assert len(catalog.list_checkpoints(layout)) == 4; catalog.list_runs(layout); "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr


def test_list_caches_comes_from_the_cache_registry(root: Path, tiny_cache: Path) -> None:
    caches = catalog.list_caches(Layout.resolve(root))
    assert [(c["path"], c["status"]) for c in caches] == [(str(tiny_cache), "ok")]
