"""Samples during training and tracking sinks: a run with samples trains exactly the run without
them; the samples reach the log, `logs`, the report and the sinks; each sink writes what the events
say; a sink whose package is missing is refused before anything is written."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import protocol as P
from engine.cli import main
from engine.config import RunConfig
from engine.errors import UserError
from engine.paths import Layout
from engine.tracking import SAMPLES, CsvSink, Metrics, Trackers, WandbSink, metrics
from tests.train_support import BACKENDS, read_log, step_losses, weights

STEPS = 6


def tiny_run(cache: Path, name: str, **train: Any) -> RunConfig:
    settings = {"max_steps": STEPS, "log_interval": 1, "save_interval": STEPS, "micro_batch": 4, "eval_interval": 1000,
                "precision": "fp32", "device": "cpu", "lr": 3e-3, "seed": 7, **train}
    return RunConfig.from_dict({"name": name, "model": {"preset": "tiny"}, "data": {"cache": str(cache)},
                                "train": settings}).validate()


def train_in_process(layout: Layout, cfg: RunConfig) -> None:
    from engine.assemble import new_run, run_to_end
    from engine.train import Options

    assert run_to_end(lambda: new_run(cfg, layout, Options(sinks=[Trackers(layout)]))) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Two runs of the same model from the same cache: `plain`, and `sampled` with samples every 2
    steps and the csv and tensorboard trackers on."""
    from conftest import corpus_texts, write_txt_corpus
    from engine.cache.build import build_cache
    from engine.config import DataConfig

    base = tmp_path_factory.mktemp("samples")
    layout = Layout(base / "root")
    corpus = write_txt_corpus(base / "corpus", corpus_texts(60))
    cache = build_cache(DataConfig(source=str(corpus), dataset_name="tiny", tokenizer="bytes", seq_len=32,
                                   docs_per_chunk=4), layout, workers=1)
    train_in_process(layout, tiny_run(cache, "plain"))
    train_in_process(layout, tiny_run(cache, "sampled", sample_every=2, sample_prompt="the model", sample_tokens=8,
                                      tracker="csv,tensorboard"))
    return layout


@pytest.mark.slow
def test_samples_leave_the_training_bit_exact(runs: Layout) -> None:
    plain, sampled = read_log(runs.root, "plain", 1), read_log(runs.root, "sampled", 1)
    assert step_losses(sampled) == step_losses(plain) and len(step_losses(plain)) == STEPS
    a, b = weights(runs.checkpoint_dir("plain", STEPS)), weights(runs.checkpoint_dir("sampled", STEPS))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rng = [json.loads((runs.checkpoint_dir(m, STEPS) / "trainer_state.json").read_text())["rng"] for m in ("plain", "sampled")]
    assert rng[0] == rng[1]  # what a resume restores: sampling drew from no generator the run uses
    samples = [e for e in sampled if e["event"] == "sample"]
    assert [s["step"] for s in samples] == [2, 4, 6] and not any(e["event"] == "sample" for e in plain)
    assert all(s["prompt"] == "the model" and 1 <= s["new_tokens"] <= 8 for s in samples)


@pytest.mark.slow
def test_samples_reach_logs_and_the_report(runs: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.report import collect

    samples = [e for e in read_log(runs.root, "sampled", 1) if e["event"] == "sample"]
    assert main(["--root", str(runs.root), "logs", "sampled"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "Sample at step" in line]
    assert len(lines) == 3 and lines[0].endswith(f"Sample at step 2: 'the model' → {P.one_line(samples[0]['text'])}")
    assert [(s["step"], s["text"]) for s in collect(runs, "sampled").samples] == [(s["step"], s["text"]) for s in samples]


@pytest.mark.slow
def test_csv_tracker_holds_every_series_of_the_log(runs: Layout) -> None:
    events = read_log(runs.root, "sampled", 1)
    with open(runs.metrics_csv("sampled", 1), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["value"]) for r in rows if r["name"] == "train/loss"}
    assert losses == step_losses(events)
    texts = [(int(r["step"]), r["value"]) for r in rows if r["name"] == SAMPLES]
    assert texts == [(e["step"], e["prompt"] + e["text"]) for e in events if e["event"] == "sample"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [float(r["value"]) for r in rows if r["name"] == "eval/loss"] == [e["loss"] for e in evals]
    assert {r["name"] for r in rows} >= {"train/lr", "train/grad_norm", "train/tokens_per_sec", "memory/rss_gb",
                                        "checkpoint/seconds"}


@pytest.mark.slow
def test_tensorboard_event_files_read_back(runs: Layout) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs.tensorboard_dir("sampled", 1)))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    expected = step_losses(read_log(runs.root, "sampled", 1))
    assert losses.keys() == expected.keys()
    assert all(losses[k] == pytest.approx(expected[k], rel=1e-6) for k in expected)
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [2, 4, 6]


def test_a_sample_is_one_human_line() -> None:
    sample = P.TrainingSample(step=1200, prompt="def f", text="(x):\n    return x\n")
    assert P.describe(sample) == "Sample at step 1,200: 'def f' → (x):⏎    return x"
    assert P.describe(P.TrainingSample(step=3, prompt="", text="a\nb")) == "Sample at step 3: a⏎b"


def test_events_map_to_series() -> None:
    step = P.Step(step=5, total_steps=10, loss=2.5, lr=1e-3, grad_norm=0.5, tokens_per_sec=100.0, eta_s=None,
                  progress_pct=50.0, rss_gb=1.5, device_mem_gb=0.25, tokens_seen=640)
    m = metrics(step, 0)
    assert m is not None and m.step == 5 and m.scalars == {
        "train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "train/tokens_per_sec": 100.0,
        "train/tokens_seen": 640.0, "memory/rss_gb": 1.5, "memory/device_gb": 0.25}
    assert metrics(P.Eval(step=5, loss=2.0, perplexity=7.39), 0) == Metrics(5, {"eval/loss": 2.0, "eval/perplexity": 7.39})
    sample = metrics(P.TrainingSample(step=6, prompt="def ", text="f(x):", seconds=0.5), 0)
    assert sample == Metrics(6, {"samples/seconds": 0.5}, {SAMPLES: "def f(x):"})
    # the OOM ladder's and the divergence guard's events, by name, whatever else they carry
    fallback = metrics(P.decode({"event": "oom_fallback", "message": "micro_batch 8 -> 4"}), 7)
    assert fallback == Metrics(7, {"events/fallback": 1.0}, {"events": "oom_fallback: micro_batch 8 -> 4"})
    assert metrics(P.Log(message="hello"), 7) is None and metrics(P.State(state="paused"), 7) is None


class FakeRun:
    def __init__(self, **kwargs: Any) -> None:
        self.init, self.logged, self.finished = kwargs, [], False
        self.name, self.settings = kwargs["name"], types.SimpleNamespace(mode=kwargs["mode"] or "online")

    def log(self, data: dict[str, Any], step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


def test_wandb_sink_maps_events_and_never_asks_to_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the wandb module: what the sink asks of it, with no network and no account."""
    made: list[FakeRun] = []
    fake = types.SimpleNamespace(init=lambda **kw: made.append(FakeRun(**kw)) or made[-1],
                                 Settings=lambda **kw: kw, Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in, so offline
    layout = Layout(tmp_path / "root")
    sink = WandbSink(layout, P.RunStarted(model="m", run=2, config={"train": {"tracker": "wandb"}}))
    run = made[0]
    assert run.init["mode"] == "offline" and run.init["name"] == "m_run_2" and run.init["group"] == "m"
    assert run.init["dir"] == str(layout.logs_root) and run.init["settings"]["console"] == "off"
    sink.write(Metrics(4, {"train/loss": 2.0}), 0.0)
    sink.write(Metrics(6, {"samples/seconds": 0.1}, {SAMPLES: "abc"}), 0.0)
    sink.write(Metrics(8, {}, {SAMPLES: "def"}), 0.0)
    sink.close()
    assert run.logged[0] == (4, {"train/loss": 2.0})
    assert run.logged[2] == (8, {SAMPLES: ("table", ["step", "text"], [[6, "abc"], [8, "def"]])})
    assert run.finished
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice is wandb's to read
    WandbSink(layout, P.RunStarted(model="m", run=3))
    assert made[1].init["mode"] is None


def test_wandb_offline_run_is_written_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    layout = Layout(tmp_path)
    sink = WandbSink(layout, P.RunStarted(model="m", run=1, config={"train": {"lr": 0.5}}))
    sink.write(Metrics(3, {"train/loss": 1.25}, {SAMPLES: "hello"}), 0.0)
    sink.close()
    wandb.teardown()  # waits for W&B's writer process, which finishes the file after finish() returns
    (run_dir,) = (layout.logs_root / "wandb").glob("offline-run-*")
    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert b"train/loss" in data and b"1.25" in data and b"m_run_1" in data


def test_a_tracker_that_fails_is_dropped_with_one_warning(tmp_path: Path) -> None:
    from engine.run_log import RunLog

    class Broken(CsvSink):
        def write(self, m: Metrics, ts: float) -> None:
            raise OSError("disk full")

    layout = Layout(tmp_path)
    trackers = Trackers(layout)
    log = RunLog(events=True, stream=open(tmp_path / "out.jsonl", "w", encoding="utf-8"))
    log.sinks.append(trackers)
    log.attach(layout.run_log("m", 1), P.RunStarted(model="m", run=1, config={"train": {"tracker": "csv"}}))
    trackers.sinks["csv"] = Broken(tmp_path / "broken.csv")
    log.emit(P.Eval(step=1, loss=1.0, perplexity=2.7))
    log.emit(P.Eval(step=2, loss=1.0, perplexity=2.7))
    log.close()
    kinds = [json.loads(line) for line in layout.run_log("m", 1).read_text().splitlines()]
    warnings = [e["message"] for e in kinds if e["event"] == "warning"]
    assert warnings == ["tracker csv failed (OSError: disk full); training goes on without it"]
    assert [e["event"] for e in kinds].count("eval") == 2


def test_only_rank_0_tracks(tmp_path: Path) -> None:
    from engine.run_log import RunLog

    layout = Layout(tmp_path)
    for rank, enabled in ((1, False), (0, True)):
        log = RunLog(events=True, enabled=enabled, stream=open(tmp_path / f"out{rank}", "w", encoding="utf-8"))
        log.sinks.append(Trackers(layout))
        log.attach(layout.run_log("m", 1), P.RunStarted(model="m", run=1, config={"train": {"tracker": "csv"}}))
        log.emit(P.Eval(step=1, loss=1.0, perplexity=2.7))
        log.close()
        assert layout.metrics_csv("m", 1).exists() == enabled


def test_a_missing_tracker_package_is_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    root = tmp_path / "root"
    rc = main(["--root", str(root), "train", "--source", str(tmp_path), "--tracker", "csv,wandb", "--sample-every", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err == ["error: --tracker wandb needs the wandb package: pip install 'packtrain[wandb]'"]
    assert not root.exists()
    with pytest.raises(UserError, match="unknown tracker 'mlflow'; choose from tensorboard, wandb, csv"):
        tiny_run(tmp_path, "x", tracker="csv,mlflow")
    with pytest.raises(UserError, match="train.sample_tokens .32. must leave room for a prompt in seq_len 32"):
        RunConfig.from_dict({"data": {"seq_len": 32}, "train": {"sample_every": 1, "sample_tokens": 32}}).validate()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "mlx"])
def test_mlx_refuses_samples_in_one_line(runs: Layout, backend: str) -> None:
    cache = runs.cache_dir(32, "tiny")
    with pytest.raises(UserError) as refused:
        from engine.assemble import new_run
        from engine.train import Options

        new_run(tiny_run(cache, "mlx_sampled", backend=backend, sample_every=2), runs, Options())
    assert str(refused.value) == ("train.sample_every: the mlx backend cannot generate samples during training; "
                                  "train with --backend torch, or leave --sample-every out")
    assert not runs.run_json("mlx_sampled").exists()
