"""`packtrain-engine control | runs list | logs | report`: steering and watching from a shell, on
fake run logs (no training), with the one-line refusals every command owes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from app_testkit import REPO, T0, fake_events, pretend_engine, write_log

from engine import cli
from engine import protocol as P
from engine import report
from engine.control import poll_commands
from engine.paths import Layout

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    return Layout.resolve(tmp_path).ensure()


def run(*argv: str) -> int:
    return cli.main(list(argv))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def write_events(layout: Layout, model: str, items: list[Any], run: int) -> None:
    """A run log of protocol events and raw dicts (events a newer engine logs, unknown to this one)."""
    lines = [P.encode(e) if isinstance(e, P.Event) else json.dumps(e) for e in items]
    layout.run_log(model, run).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def story(layout: Layout, model: str = "story") -> None:
    """Run 1: 200 steps, the dataset grows at 150, an OOM fallback at 120 (as a newer engine logs it);
    run 2 resumes at 200, rolls back once, logs a sample, and finishes."""
    first: list[Any] = fake_events(model, run=1, steps=200, total=400)
    first.insert(130, {"v": 1, "event": "oom_fallback", "ts": T0 + 120, "step": 120,
                       "message": "micro_batch 8 -> 4, grad_accum 1 -> 2"})
    first.insert(170, P.CacheExpanded(ts=T0 + 150, step=150, n_before=8000, n_after=9000, total_steps_before=400,
                                      total_steps_after=450))
    first.append(P.Warning(ts=T0 + 201, message="slow disk"))
    first.append(P.Warning(ts=T0 + 202, message="Rollback to checkpoint 200 skipped: nothing to undo"))
    write_events(layout, model, first, run=1)
    second: list[Any] = [P.RunStarted(ts=T0 + 300, model=model, run=2, start_step=200, total_steps=450,
                                          resumed_from=f"{model}_checkpoint_200_run_1")]
    second += [e for e in fake_events(model, run=2, steps=260, total=450, finished=True)[2:] if e.step > 200]
    second.insert(5, {"v": 1, "event": "rollback", "ts": T0 + 330, "step": 230, "reason": "3 non-finite steps"})
    second.insert(6, {"v": 1, "event": "sample", "ts": T0 + 340, "step": 240, "prompt": "def <tag>",
                      "text": "return 1", "new_tokens": 3, "seconds": 0.5})
    write_events(layout, model, second, run=2)


# --- report ------------------------------------------------------------------------------------------


def test_report_writes_plots_and_a_self_contained_page(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    story(layout)
    assert run("report", "story") == 0
    page = layout.model_dir("story") / "report" / "report.html"
    assert capsys.readouterr().out.strip() == f"Report written: {page}"
    files = {p.name: p.read_bytes() for p in page.parent.iterdir()}
    assert set(files) == {"report.html", "loss.png", "lr.png", "throughput.png", "memory.png", "grad_norm.png"}
    assert all(data.startswith(PNG) for name, data in files.items() if name.endswith(".png"))

    html = files["report.html"].decode()
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    assert html.count('src="data:image/png;base64,') == 5  # every curve, inlined
    for expected in ("run 2 resumed from story_checkpoint_200_run_1", "dataset 8,000 → 9,000 sequences",
                     "micro_batch 8 -&gt; 4, grad_accum 1 -&gt; 2", "3 non-finite steps", "slow disk",
                     "def &lt;tag&gt;", "no checkpoints on disk", "warmup_steps"):
        assert expected in html, expected
    assert "<tag>" not in html, "text from the logs must be escaped"


def test_report_curves_span_every_run_with_a_marker_for_each_incident(layout: Layout) -> None:
    story(layout)
    history = report.collect(layout, "story")
    assert [r["run"] for r in history.runs] == [1, 2]
    assert [(m.step, m.kind) for m in history.markers] == [(120, "fallback"), (150, "growth"), (200, "rollback"),
                                                            (200, "resume"), (230, "rollback")]
    steps = [s for s in history.columns["step"] if s == s]
    assert steps == list(range(1, 261)) and history.n_steps == 260
    assert len(history.columns["step"]) == 261, "one gap between the runs, so their curves are not joined"
    assert [s for s, _ in history.evals] == [100, 200]
    assert history.samples == [{"step": 240, "prompt": "def <tag>", "text": "return 1", "new_tokens": 3, "seconds": 0.5}]


def test_report_shows_the_cache_and_its_document_lengths(layout: Layout, tiny_cache: Path) -> None:
    events = fake_events("cached", steps=20, finished=True)
    events[0] = P.RunStarted(ts=T0, model="cached", run=1, total_steps=1000, config={
        "name": "cached", "data": {"cache": str(tiny_cache), "seq_len": 32, "tokenizer": "bytes"}})
    write_log(layout, "cached", events)
    report.write_report(layout, "cached")
    folder = layout.model_dir("cached") / "report"
    assert (folder / "doc_lengths.png").read_bytes().startswith(PNG)
    html = (folder / "report.html").read_text()
    stats = json.loads((tiny_cache / "stats.json").read_text())
    assert str(tiny_cache) in html and "Document lengths in tokens" in html
    assert f'<td class="n">{stats["doc_tokens"]["p99"]:,}</td>' in html
    assert html.count('src="data:image/png;base64,') == 6


def test_a_new_report_replaces_the_old_whole_and_a_failed_one_leaves_it(layout: Layout,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    story(layout)
    page = report.write_report(layout, "story")
    (page.parent / "stale.png").write_bytes(b"old")
    report.write_report(layout, "story")
    assert not (page.parent / "stale.png").exists()
    model_dir = layout.model_dir("story")
    assert sorted(p.name for p in model_dir.iterdir()) == ["report"], "temporaries left behind"

    before = page.read_bytes()

    def broken(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.report_html.render_html", broken)
    with pytest.raises(OSError):
        report.write_report(layout, "story")
    assert page.read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["report"]


@pytest.mark.parametrize(("argv", "match"), [
    (["report", "../escape"], "invalid model name"),
    (["report", "nobody"], "no runs of 'nobody'"),
    (["logs", "a/b"], "invalid model name"),
    (["logs", "nobody"], "no runs of 'nobody'"),
    (["logs", "story", "--run", "9"], "has no run 9; its runs are 1, 2"),
    (["control", "story", "save"], "no live engine is training 'story'"),
    (["control", "../x", "stop"], "invalid model name"),
    (["serve", "--host", "0.0.0.0"], "without a token"),
])
def test_bad_input_is_one_line_and_writes_nothing(layout: Layout, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, argv: list[str], match: str) -> None:
    monkeypatch.delenv("PACKTRAIN_API_TOKEN", raising=False)
    story(layout)
    before = tree(layout.root)
    assert run(*argv) != 0
    assert match in one_error_line(capsys)
    assert tree(layout.root) == before


def test_report_without_matplotlib_says_how_to_install_it(layout: Layout, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    story(layout)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert run("report", "story") != 0
    assert "pip install 'packtrain[report]'" in one_error_line(capsys)


def test_operating_commands_never_import_torch(layout: Layout) -> None:
    story(layout)
    code = ("import sys\nfrom engine import cli\n"
            "for argv in (['runs', 'list'], ['logs', 'story'], ['report', 'story']):\n"
            "    assert cli.main(argv) == 0, argv\n"
            "import engine.api\n"
            "print('heavy:', *(m for m in ('torch', 'transformers', 'datasets', 'tokenizers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PACKTRAIN_HOME": str(layout.root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "heavy:", "an operating command imported an ML library"


# --- runs, logs, control -----------------------------------------------------------------------------------


def test_runs_list_as_json_and_as_a_table(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    story(layout)
    assert run("runs", "list", "--json") == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["run"], r["last_step"], r["finished"]) for r in runs] == [("story", 2, 260, "completed"),
                                                                                    ("story", 1, 200, None)]
    assert run("runs", "list") == 0
    out = capsys.readouterr().out
    assert "260/450" in out and "story_checkpoint_200_run_1" in out and "ended without finishing" in out


def test_logs_prints_the_engines_own_lines(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    story(layout)
    assert run("logs", "story") == 0  # the newest run
    lines = capsys.readouterr().out.splitlines()
    assert "Run 2 of story (resumed from story_checkpoint_200_run_1), step 200" in lines[0]
    assert lines[-1].endswith("Finished (completed) at step 260")
    assert any(line.endswith("Step 260/450 (57.8%) | Loss: 2.594 | 20,150 tok/s | ETA: 06:20m") for line in lines)
    assert run("logs", "story", "--run", "1") == 0
    out = capsys.readouterr().out
    assert "warning: slow disk" in out and "Step 200/400 (50.0%)" in out and "Finished" not in out


def test_logs_follow_prints_new_events_until_the_run_finishes(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(layout, "live", fake_events("live", steps=3, total=6))
    pretend_engine(layout, "live", log)

    def engine_goes_on() -> None:
        time.sleep(0.5)
        with open(log, "a", encoding="utf-8") as f:
            for event in (*fake_events("live", steps=6, total=6)[5:], P.Finished(step=6, reason="stopped")):
                f.write(P.encode(event) + "\n")
                f.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=engine_goes_on)
    writer.start()
    try:
        assert run("logs", "live", "--follow") == 0
    finally:
        writer.join()
    out = capsys.readouterr().out
    assert "Step 3/6" in out and "Step 6/6" in out and out.rstrip().endswith("Finished (stopped) at step 6")


def test_logs_follow_ends_when_its_engine_is_gone(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(layout, "killed", fake_events("killed", steps=3, total=6))
    assert run("logs", "killed", "--follow") == 1
    captured = capsys.readouterr()
    assert "Step 3/6" in captured.out and "gone without finishing" in captured.err


def test_control_sends_each_command_to_the_live_engine(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    pretend_engine(layout, "live", write_log(layout, "live", fake_events("live", steps=3)))
    for word, wire in (("save", "save"), ("stop-at-next-checkpoint", "stop_at_checkpoint"), ("pause", "pause"),
                       ("resume", "resume"), ("stop", "stop")):
        assert run("control", "live", word) == 0
        assert f"Sent {word} to the engine training live (pid {os.getpid()})" in capsys.readouterr().out
        [command] = poll_commands(layout, "live")
        assert command.command == wire and command.sender.startswith("cli:")
