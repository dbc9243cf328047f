"""`packtrain-engine serve`: the HTTP API as a client sees it, against a real uvicorn server on a
loopback port (the command itself, started as a process): reads, commands, tokens, traversal
attempts, and server-sent events from a live run log."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from app_testkit import REPO, engine_env, fake_events, make_corpus, pretend_engine, write_log

from engine import protocol as P
from engine.checkpoint import Checkpointer
from engine.control import poll_commands
from engine.paths import Layout
from test_checkpoint import of, trained_once, trainer_state

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """`story` (two finished runs, no checkpoints), `alpha` (checkpoints 1 and 2, a run.json) and
    `live` (a run whose 'engine' is this test process, so its log is live while the test writes it)."""
    layout = Layout.resolve(tmp_path_factory.mktemp("api")).ensure()
    write_log(layout, "story", fake_events("story", steps=120, finished=True), run=1)
    write_log(layout, "story", fake_events("story", run=2, steps=30, finished=True), run=2)
    model, opt = trained_once()
    alpha = Checkpointer(layout, "alpha", keep_last=5)
    for step in (1, 2):
        alpha.save(step=step, backend=of(model, opt), trainer_state=trainer_state(step))
    layout.run_json("alpha").write_text(json.dumps({"config": {"name": "alpha"}, "runs": []}))
    pretend_engine(layout, "live", write_log(layout, "live", fake_events("live", steps=3, total=5)))
    layout.run_json("live").write_text(json.dumps({"config": {"name": "live"}, "runs": []}))
    return layout


def serve(layout: Layout, *flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--root", str(layout.root), "serve", "--port", "0", *flags],
                            cwd=REPO, env=env or engine_env(layout.root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/api", first)
        assert match, f"no serving line: {first!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def base(layout: Layout) -> Iterator[str]:
    yield from serve(layout)


@pytest.fixture(scope="module")
def guarded(layout: Layout) -> Iterator[str]:
    """A server whose token comes from the environment."""
    yield from serve(layout, env=engine_env(layout.root) | {"PACKTRAIN_API_TOKEN": TOKEN})


@pytest.fixture
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=15) as c:
        yield c


def raw(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A request with the path exactly as given: no client-side normalising of `..` or `%2F`."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, json.loads(body) if body else None


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- reading --------------------------------------------------------------------------------------------


def test_reads_runs_checkpoints_caches_and_metrics(client: httpx.Client, layout: Layout) -> None:
    assert client.get("/api/health").json()["ok"] is True
    runs = client.get("/api/runs").json()
    assert {(r["model"], r["run"]) for r in runs} == {("story", 1), ("story", 2), ("live", 1)}
    [live] = client.get("/api/runs", params={"model": "live"}).json()
    assert live["live"] is True and live["last_step"] == 3

    checkpoints = client.get("/api/checkpoints", params={"model": "alpha"}).json()
    assert [c["display_name"] for c in checkpoints] == ["alpha_checkpoint_2_run_1", "alpha_checkpoint_1_run_1"]
    assert client.get("/api/caches").json() == []

    metrics = client.get("/api/runs/story/1/metrics").json()
    assert [s["step"] for s in metrics["steps"]] == list(range(1, 121))
    assert [e["step"] for e in metrics["evals"]] == [100]
    assert metrics["header"]["model"] == "story" and metrics["finished"]["reason"] == "completed"
    missing = client.get("/api/runs/story/9/metrics")
    assert missing.status_code == 404 and "no run 9" in missing.json()["error"]


def test_live_events_stream_as_server_sent_events(client: httpx.Client, layout: Layout) -> None:
    log = layout.run_log("live", 1)
    kinds: list[str] = []
    ids: list[int] = []

    def take(line: str) -> P.Event | None:
        if line.startswith("id: "):
            ids.append(int(line[4:]))
        if not line.startswith("data: "):
            return None
        event = P.decode(line[6:])
        kinds.append(event.kind)
        return event

    with client.stream("GET", "/api/runs/live/1/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            event = take(line)
            if isinstance(event, P.Step) and event.step == 3:
                break  # the backlog is read: now the engine logs on
        backlog_end = ids[-1]
        with open(log, "a", encoding="utf-8") as f:
            for event in (fake_events("live", steps=4, total=5)[-1], P.Finished(step=4, reason="stopped")):
                f.write(P.encode(event) + "\n")
                f.flush()
        for line in lines:  # the stream ends by itself after `finished`
            take(line)
    assert kinds == ["run", "plan", "step", "step", "step", "step", "finished"]
    assert ids[-1] == log.stat().st_size, "the last id is where a reconnect would resume: the end"

    again = client.get("/api/runs/live/1/events", headers={"Last-Event-ID": str(backlog_end)})
    assert [P.decode(line[6:]).kind for line in again.text.splitlines() if line.startswith("data: ")] == \
        ["step", "finished"], "a reconnect resumes after the last id it saw"


# --- commands -------------------------------------------------------------------------------------------


def test_control_reaches_only_a_live_engine(client: httpx.Client, layout: Layout) -> None:
    sent = client.post("/api/models/live/control/stop-at-next-checkpoint")
    assert sent.status_code == 202 and sent.json()["command"] == "stop-at-next-checkpoint"
    assert [c.command for c in poll_commands(layout, "live")] == ["stop_at_checkpoint"]
    refused = client.post("/api/models/story/control/save")
    assert refused.status_code == 409 and "no live engine is training 'story'" in refused.json()["error"]
    assert client.post("/api/models/live/control/explode").status_code == 404
    assert poll_commands(layout, "live") == []


def test_delete_a_checkpoint_by_display_name(client: httpx.Client, layout: Layout) -> None:
    gone = client.delete("/api/checkpoints/alpha_checkpoint_1_run_1")
    assert gone.status_code == 200 and gone.json()["deleted"] == ["alpha_checkpoint_1_run_1"]
    assert not layout.checkpoint_dir("alpha", 1).exists() and layout.checkpoint_dir("alpha", 2).exists()
    again = client.delete("/api/checkpoints/alpha_checkpoint_1_run_1")
    assert again.status_code == 404 and "no checkpoint named" in again.json()["error"]


def test_a_bad_config_is_refused_with_the_cli_message(client: httpx.Client, layout: Layout) -> None:
    before = tree(layout.root)
    for config, status, match in (
        ({"name": "x", "train": {"lr": -1}}, 400, "train.lr must be a positive number"),
        ({"name": "x", "train": {"lerning_rate": 1}}, 400, "lerning_rate"),
        ({"train": {"lr": 0.1}}, 400, "needs a name"),
        ({"name": "../evil"}, 400, "invalid model name"),
        ({"name": "live"}, 409, "already training 'live'"),
        ({"name": "alpha"}, 409, "already exists"),
        ([1, 2], 422, "body"),
    ):
        response = client.post("/api/runs", json=config)
        assert response.status_code == status and match in response.json()["error"], (config, response.text)
    for body, status, match in (
        ({"max_steps": 0}, 422, "max_steps"),
        ({"checkpoint": "/etc/passwd"}, 400, "not a checkpoint display name"),
        ({"checkpoint": "beta_checkpoint_1_run_1"}, 404, "no checkpoint named"),
    ):
        response = client.post("/api/models/alpha/resume", json=body)
        assert response.status_code == status and match in response.json()["error"], (body, response.text)
    assert client.post("/api/models/nobody/resume").status_code == 404
    assert client.post("/api/models/live/resume").status_code == 409
    assert tree(layout.root) == before


# --- guards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/runs/../1/metrics"),
    ("GET", "/api/runs/%2e%2e/1/metrics"),
    ("GET", "/api/runs/..%2F..%2Fetc/1/metrics"),
    ("GET", "/api/runs/story/1/..%2F..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/api/runs/%2Fetc%2Fpasswd/1/events"),
    ("GET", "/api/checkpoints?model=../x"),
    ("GET", "/api/checkpoints?model=%2Fetc"),
    ("DELETE", "/api/checkpoints/.."),
    ("DELETE", "/api/checkpoints/..%2F..%2Fcheckpoints%2Falpha%2Fcheckpoint_000002"),
    ("DELETE", "/api/checkpoints/%2Ftmp%2Falpha%2Fcheckpoint_000002"),
    ("DELETE", "/api/checkpoints/alpha%2Fcheckpoint_000002"),
    ("DELETE", "/api/checkpoints/..%2Falpha_checkpoint_2_run_1"),
    ("POST", "/api/models/..%2Fx/control/stop"),
    ("POST", "/api/models/../control/stop"),
    ("POST", "/api/models/.hidden/resume"),
])
def test_traversal_attempts_get_a_json_4xx_and_touch_nothing(base: str, layout: Layout, method: str,
                                                             path: str) -> None:
    before = tree(layout.root)
    status, body = raw(base, method, path)
    assert 400 <= status < 500 and isinstance(body, dict) and body.get("error"), (status, body)
    assert tree(layout.root) == before and layout.checkpoint_dir("alpha", 2).exists()


def test_with_a_token_every_request_needs_it(guarded: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        for method, path in (("GET", "/api/health"), ("GET", "/api/runs"), ("GET", "/api/nowhere"),
                             ("DELETE", "/api/checkpoints/alpha_checkpoint_2_run_1"), ("POST", "/api/runs")):
            status, body = raw(guarded, method, path, headers)
            assert status == 401 and "token" in body["error"], (headers, path, status)
    status, body = raw(guarded, "GET", "/api/runs?model=story", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and len(body) == 2


def test_binding_beyond_loopback_needs_a_token(layout: Layout) -> None:
    env = engine_env(layout.root)
    env.pop("PACKTRAIN_API_TOKEN", None)
    refused = subprocess.run([sys.executable, "-m", "engine", "serve", "--host", "0.0.0.0", "--port", "0"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.startswith("error: refusing to serve on 0.0.0.0 without a token")
    assert refused.stderr.count("\n") == 1


# --- starting engines -----------------------------------------------------------------------------------


def wait_run(client: httpx.Client, model: str, run: int, timeout: float = 400) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {r["run"]: r for r in client.get("/api/runs", params={"model": model}).json()}
        if run in runs and runs[run]["finished"]:
            return runs[run]
        time.sleep(0.5)
    console = client.get("/api/health").json()["root"] + f"/training_logs/{model}.console.log"
    raise AssertionError(f"run {run} of {model} did not finish: {Path(console).read_text()[-2000:]}")


@pytest.mark.slow
def test_start_a_training_from_a_config_then_extend_it(client: httpx.Client, layout: Layout,
                                                       tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", 60)
    config = {"name": "remote", "model": {"preset": "tiny"},
              "data": {"source": str(corpus), "tokenizer": "bytes", "seq_len": 32, "docs_per_chunk": 20},
              "train": {"max_steps": 4, "save_interval": 4, "log_interval": 1, "micro_batch": 4, "device": "cpu",
                        "precision": "fp32", "eval_interval": 1000}}
    started = client.post("/api/runs", json=config)
    assert started.status_code == 202, started.text
    assert started.json()["args"] == ["train", "--config", str(layout.config_yaml("remote"))]
    first = wait_run(client, "remote", 1)
    assert first["finished"] == "completed" and first["last_step"] == 4

    extended = client.post("/api/models/remote/resume", json={"max_steps": 6})
    assert extended.status_code == 202 and extended.json()["args"] == ["resume", "remote", "--max-steps", "6"]
    second = wait_run(client, "remote", 2)
    assert second["finished"] == "completed" and second["last_step"] == 6
    assert second["resumed_from"] == "remote_checkpoint_4_run_1"
    names = [c["display_name"] for c in client.get("/api/checkpoints", params={"model": "remote"}).json()]
    assert names[0] == "remote_checkpoint_6_run_2"
