"""The event schema round-trips, tolerates newer engines and never yields half a line to a tailer."""

from __future__ import annotations

import json
import math
import re

import pytest

from engine import protocol as p


def test_every_event_round_trips() -> None:
    samples = [
        p.RunStarted(model="m", run=2, start_step=10, total_steps=100, config={"a": 1}),
        p.Plan(total_steps=100, warmup_steps=5, n_sequences=1000, global_batch=8, tokens_per_step=2048),
        p.Step(step=1, total_steps=100, loss=5.0, lr=1e-3, grad_norm=0.5, tokens_per_sec=10.0, eta_s=60.0,
               progress_pct=1.0, rss_gb=0.2),
        p.Eval(step=1, loss=4.0, perplexity=math.exp(4.0)),
        p.TrainingSample(step=4, prompt="def", text=" f(x):\n    return ✓", new_tokens=9, seconds=0.1),
        p.CacheExpanded(step=5, n_before=10, n_after=20, total_steps_before=3, total_steps_after=6),
        p.CheckpointSaved(step=5, path="/x", display_name="m_checkpoint_5_run_1"),
        p.OomFallback(step=3, micro_batch=2, grad_accum=4, grad_checkpointing=False, message="Out of memory"),
        p.DivergenceRollback(step=9, to_step=6, skipped=3, lr_scale=0.5, message="Diverged"),
        p.State(state="paused"),
        p.Log(message="hello"),
        p.Warning(message="careful"),
        p.Error(message="boom", detail="tb"),
        p.Finished(step=5, reason="stopped"),
        p.CacheProgress(stage="build", cache="/c", docs=3),
        p.CacheReady(cache="/c", chunks=1, sequences=3, bad=[{"chunk": 0, "reason": "hash"}]),
        p.ModelLoaded(checkpoint="m_checkpoint_5_run_1", path="/x", step=5, context=256, chat_template=True),
        p.GenerationStarted(request="g", sample=1, samples=2, seed=8, prompt_tokens=3),
        p.Token(text="héllo", request="g", sample=1),
        p.GenerationDone(text="héllo", reason="stop", request="g", new_tokens=4, first_token_s=0.01),
        p.EvalProgress(checkpoint="m", batches_done=1, batches_total=4, tokens=1024),
        p.EvalResult(checkpoint="m", step=5, data="held-out", loss=2.0, perplexity=7.39, bpb=1.2, top1=0.3, top5=0.6,
                     tokens=1024, bytes=3000),
        p.Done(request="g", command="generate", status="interrupted"),
    ]
    assert {type(e) for e in samples} == set(p.EVENT_TYPES.values())
    for event in samples:
        line = p.encode(event)
        assert "\n" not in line
        assert json.loads(line)["v"] == p.SCHEMA_VERSION
        assert p.decode(line) == event


def test_non_finite_floats_become_null_and_stay_parseable() -> None:
    line = p.encode(p.Eval(step=1, loss=float("nan"), perplexity=float("inf")))
    assert json.loads(line)["loss"] is None


def test_unknown_events_and_extra_fields_are_tolerated() -> None:
    assert isinstance(p.decode('{"v": 9, "event": "telemetry", "x": 1}'), p.Unknown)
    e = p.decode('{"v": 2, "event": "log", "message": "hi", "new_field": 3, "ts": 1.0}')
    assert e == p.Log(message="hi", ts=1.0)
    assert isinstance(p.decode('{"event": "step", "step": 1}'), p.Unknown)  # required fields missing


@pytest.mark.parametrize("fields", [
    {"step": "3"}, {"step": 3.0}, {"step": True}, {"loss": "low"}, {"loss": False}, {"ts": "now"},
    {"total_steps": [1]}, {"eta_s": "soon"},
])
def test_a_field_of_the_wrong_type_decodes_as_unknown(fields: dict) -> None:
    """decode is the one check every reader (TUI, catalog, scripts) relies on: a hand-edited or
    foreign log line never reaches a formatter with a string where a number belongs."""
    good = {"event": "step", "step": 3, "total_steps": 10, "loss": 2.5, "lr": 1e-3, "grad_norm": 1, "ts": 5.0,
            "tokens_per_sec": 1.0, "eta_s": 3.0, "progress_pct": 30.0, "rss_gb": 1.0}
    assert isinstance(p.decode(good), p.Step)
    bad = p.decode(json.dumps({**good, **fields}))
    assert isinstance(bad, p.Unknown) and bad.raw["event"] == "step"
    assert bad.ts == (5.0 if "ts" not in fields else 0.0)


def test_decode_checks_literals_and_nested_fields() -> None:
    assert isinstance(p.decode({"event": "state", "state": "sleeping"}), p.Unknown)
    assert isinstance(p.decode({"event": "finished", "step": 1, "reason": 5}), p.Unknown)
    assert isinstance(p.decode({"event": "cache_ready", "cache": "c", "chunks": 1, "sequences": 2, "bad": [3]}),
                      p.Unknown)
    assert isinstance(p.decode({"event": "run", "model": "m", "run": 1, "config": {"1": 2}}), p.RunStarted)
    assert isinstance(p.decode({"event": "run", "model": "m", "run": 1, "config": [1]}), p.Unknown)
    assert isinstance(p.decode({"event": [1], "model": "m"}), p.Unknown)
    with pytest.raises(ValueError):
        p.decode("[1, 2]")


def test_null_is_nan_in_float_fields_and_unknown_where_none_is_allowed() -> None:
    e = p.decode(p.encode(p.Step(step=1, total_steps=2, loss=float("nan"), lr=0.0, grad_norm=float("inf"),
                                 tokens_per_sec=1.0, eta_s=float("inf"), progress_pct=50.0, rss_gb=1.0)))
    assert isinstance(e, p.Step) and math.isnan(e.loss) and math.isnan(e.grad_norm) and e.eta_s is None
    saved = p.decode(p.encode(p.CheckpointSaved(step=1, path="x", display_name="d", loss=float("nan"))))
    assert isinstance(saved, p.CheckpointSaved) and saved.loss is None


def test_read_events_leaves_a_torn_line_for_later(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    first = p.encode(p.Log(message="one"))
    second = p.encode(p.Log(message="two"))
    log.write_text(first + "\n" + second[:10])
    events, offset = p.read_events(str(log))
    assert [e.message for e in events] == ["one"]
    with open(log, "a") as f:
        f.write(second[10:] + "\n")
    events, offset2 = p.read_events(str(log), offset)
    assert [e.message for e in events] == ["two"]
    assert offset2 == log.stat().st_size


def test_read_events_keeps_lines_that_are_no_event_as_unknown(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text('[1, 2]\nnot json\n{"event": "eval", "step": "x", "loss": 1, "perplexity": 1}\n')
    events, _ = p.read_events(str(log))
    assert [type(e) for e in events] == [p.Unknown] * 3
    assert events[0].raw == {"line": "[1, 2]"} and events[2].raw["step"] == "x"


def test_commands_validate_their_kind() -> None:
    c = p.Command(command="save", sender="tui")
    assert p.Command.decode(c.encode()) == c
    with pytest.raises(ValueError):
        p.Command.decode('{"command": "rm -rf"}')


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "--:--"), (float("nan"), "--:--"), (0, "00:00m"), (425, "07:05m"), (3599.4, "59:59m"),
     (4 * 3600 + 23 * 60, "04:23h")]
)
def test_format_eta(seconds, text) -> None:
    assert p.format_eta(seconds) == text


def test_format_step_matches_the_documented_headline() -> None:
    e = p.Step(step=770, total_steps=26235, loss=5.583, lr=1e-3, grad_norm=1.0, tokens_per_sec=106212,
               eta_s=4 * 3600 + 23 * 60, progress_pct=770 / 26235 * 100, rss_gb=1.0)
    assert p.format_step(e) == "Step 770/26,235 (2.9%) | Loss: 5.583 | 106,212 tok/s | ETA: 04:23h"
    assert p.format_step(e, colons=False) == "Step 770/26,235 (2.9%) | Loss 5.583 | 106,212 tok/s | ETA 04:23h"


def test_serve_commands_round_trip_and_bad_ones_are_one_line_reasons() -> None:
    commands = [p.GenerateCommand(id="g", prompt="def ", temperature=0, top_k=5, stop=["\n\n"]),
                p.EvalCommand(id="e", batches=2, source="stdlib"), p.StopCommand(), p.LoadCommand(checkpoint="m"),
                p.QuitCommand()]
    for command in commands:
        assert p.decode_serve_command(command.encode()) == command
    assert p.GenerateCommand(prompt="x", seed=3).sampling() == p.SamplingParams(seed=3)
    for line, reason in [
        ("{", "not JSON"), ("[]", "a command is a JSON object"), ('{"command": "train"}', "unknown command 'train'"),
        ('{"command": "generate", "temprature": 1}', "unknown field 'temprature'"),
        ('{"command": "generate", "top_k": 0}', "top_k must be a whole number >= 1"),
        ('{"command": "generate", "top_p": 0}', "top_p must be in (0, 1]"),
        ('{"command": "generate", "temperature": -1}', "temperature must be a number >= 0"),
        ('{"command": "generate", "max_new_tokens": true}', "max_new_tokens must be a whole number >= 1"),
        ('{"command": "generate", "stop": ""}', "stop must be a list of non-empty strings"),
        ('{"command": "generate", "prompt": 3}', "prompt must be a string"),
        ('{"command": "eval", "batches": 0}', "batches must be a whole number >= 1"),
        ('{"command": "eval", "cache": "c", "source": "s"}', "give cache or source, not both"),
        ('{"command": "load"}', "checkpoint is missing"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            p.decode_serve_command(line)
