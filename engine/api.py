"""The HTTP API of `packtrain-engine serve`: a FastAPI app over the same catalog, run logs, command
channel and engine launcher the CLI and the TUI use, so it refuses exactly what they refuse.

Read: runs, checkpoints, caches, a run's metrics history, a run's live events (server-sent events
tailing its log). Write: start a training from a config, resume or extend a model, send save / stop /
pause / resume / stop-at-next-checkpoint, delete checkpoints. Every name goes through
engine.paths.check_name and every checkpoint reference through catalog.find_checkpoint, and only
display names are taken as references, so nothing outside the root can be named, probed or deleted.
Errors are JSON `{"error": "..."}` with a 4xx status; with a token, a request without
`Authorization: Bearer <token>` gets 401 before anything else is looked at.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from engine import catalog
from engine import protocol as P
from engine.atomic import atomic_write_text
from engine.config import RunConfig, given_fields, with_default_lr
from engine.control import SPELLINGS, engine_lock_held, live_engine, send_to_live
from engine.errors import UserError
from engine.launch import resume_args, spawn_detached
from engine.paths import Layout, check_name

POLL_S = 0.25
KEEPALIVE_S = 15.0
READ_SLICE = 4 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ResumeRequest(BaseModel):
    """Continue a model from its newest valid checkpoint (or `checkpoint`), optionally longer."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="display name, <model>_checkpoint_<step>_run_<k>")
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)


def create_app(layout: Layout, token: str | None = None) -> FastAPI:
    app = FastAPI(title="packtrain", summary="Runs, checkpoints and live events of one packtrain root.")
    children: list[subprocess.Popen[bytes]] = []  # engines started here, reaped as they end

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        children[:] = [p for p in children if p.poll() is None]
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    # --- reading ----------------------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "root": str(layout.root)}

    @app.get("/api/runs")
    def runs(model: str | None = None) -> list[dict[str, Any]]:
        if model is not None:
            check_name(model, "model name")
        return [r.to_dict() for r in catalog.list_runs(layout) if model is None or r.model == model]

    @app.get("/api/runs/{model}/{run}/metrics")
    def metrics(model: str, run: int) -> dict[str, Any]:
        """The run's header, steps, evals, checkpoints, growth and end, as logged."""
        data = catalog.read_run(run_log(layout, model, run))
        data.pop("offset")
        return data

    @app.get("/api/runs/{model}/{run}/events")
    def events(model: str, run: int, request: Request, offset: int = 0) -> StreamingResponse:
        """The run's events from byte `offset` (or the Last-Event-ID a reconnecting client sends),
        then live ones until the run finishes or its engine is gone."""
        path = run_log(layout, model, run)
        resume_at = request.headers.get("last-event-id", "")
        start = int(resume_at) if resume_at.isdigit() else max(offset, 0)
        return StreamingResponse(sse(layout, model, path, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/checkpoints")
    def checkpoints(model: str | None = None) -> list[dict[str, Any]]:
        if model is not None:
            check_name(model, "model name")
        return [e.to_dict() for e in catalog.list_checkpoints(layout, model)]

    @app.get("/api/caches")
    def caches() -> list[dict[str, Any]]:
        return catalog.list_caches(layout)

    # --- commands ---------------------------------------------------------------------------------------

    @app.post("/api/runs", status_code=202)
    def start(config: dict[str, Any] = Body(..., description="a run config: name, model, data, train")) -> dict[str, Any]:
        """Start a training from a config, as `packtrain-engine train --config` would."""
        cfg = RunConfig.from_dict(config)
        cfg = with_default_lr(cfg, given_fields(config)).validate()
        if not cfg.name:
            raise ApiError(400, "the config needs a name: the model's folder and the run log are named after it")
        refuse_if_busy(layout, cfg.name)
        if catalog.checkpoint_dirs(layout.model_dir(cfg.name)):
            raise ApiError(409, f"model {cfg.name!r} already exists; resume it or choose another name")
        path = layout.config_yaml(cfg.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, cfg.dump_yaml())
        return launch(cfg.name, "train", "--config", str(path))

    @app.post("/api/models/{model}/resume", status_code=202)
    def resume(model: str, body: ResumeRequest | None = None) -> dict[str, Any]:
        """Continue a model; `max_steps` or `epochs` extend a finished one."""
        check_name(model, "model name")
        body = body or ResumeRequest()
        if not layout.run_json(model).is_file():
            raise ApiError(404, f"no model named {model!r} in {layout.checkpoints_root}")
        refuse_if_busy(layout, model)
        ref = model
        if body.checkpoint is not None:
            path = checkpoint_of(layout, body.checkpoint)
            if path.parent.name != model:
                raise ApiError(400, f"{body.checkpoint!r} is not a checkpoint of {model!r}")
            ref = str(path)
        return launch(model, *resume_args(ref, max_steps=body.max_steps, epochs=body.epochs))

    @app.post("/api/models/{model}/control/{command}", status_code=202)
    def control(model: str, command: str) -> dict[str, Any]:
        """save | stop | stop-at-next-checkpoint | pause | resume, to the live engine training `model`."""
        check_name(model, "model name")
        if command not in SPELLINGS:
            raise ApiError(404, f"unknown command {command!r}; expected one of {', '.join(SPELLINGS)}")
        try:
            info = send_to_live(layout, model, command, sender=f"api:{os.getpid()}")
        except UserError as e:  # the name and the command are checked: no live engine is left
            raise ApiError(409, str(e)) from None
        return {"model": model, "command": command, "pid": info.pid}

    @app.delete("/api/checkpoints/{ref}")
    def delete(ref: str) -> dict[str, Any]:
        """Delete one checkpoint by display name, with the CLI's refusals (a live engine's latest, or
        the one it resumed from)."""
        entries = catalog.plan_delete(layout, [str(checkpoint_of(layout, ref))])
        deleted = catalog.delete_checkpoints(layout, entries)
        return {"deleted": deleted, "freed_bytes": sum(e.size_bytes for e in entries)}

    def launch(model: str, *args: str) -> dict[str, Any]:
        proc, console = spawn_detached(layout, model, *args)
        children.append(proc)
        return {"model": model, "pid": proc.pid, "args": list(args), "console": str(console)}

    return app


# --- helpers ------------------------------------------------------------------------------------------


def run_log(layout: Layout, model: str, run: int) -> Path:
    path = layout.run_log(model, run)  # check_name: a traversal attempt is a 400 here
    if not path.is_file():
        raise ApiError(404, f"{model!r} has no run {run}")
    return path


def checkpoint_of(layout: Layout, ref: str) -> Path:
    """Only display names: a path (absolute, relative, `..`) would let a client probe the server's disk."""
    if not catalog.DISPLAY_RE.match(ref):
        raise ApiError(400, f"{ref!r} is not a checkpoint display name (<model>_checkpoint_<step>_run_<k>)")
    try:
        return catalog.find_checkpoint(layout, ref)
    except UserError as e:
        raise ApiError(404, str(e)) from None


def refuse_if_busy(layout: Layout, model: str) -> None:
    engine = live_engine(layout, model)
    if engine is not None or engine_lock_held(layout, model):
        who = f" (pid {engine.pid})" if engine else ""
        raise ApiError(409, f"an engine is already training {model!r}{who}")


def _live_log(layout: Layout, model: str, path: Path) -> bool:
    info = live_engine(layout, model)
    return info is not None and Path(info.log).name == path.name


def sse_message(event: P.Event, offset: int | None) -> str:
    """One server-sent event: its kind, the protocol's JSON line, and (for the last of a batch) the
    byte offset to resume from, which a reconnecting EventSource sends back as Last-Event-ID."""
    if isinstance(event, P.Unknown):
        kind, data = "unknown", json.dumps(event.raw, separators=(",", ":"))
    else:
        kind, data = event.kind, P.encode(event)
    lines = [f"event: {kind}"] + ([f"id: {offset}"] if offset is not None else []) + [f"data: {data}"]
    return "\n".join(lines) + "\n\n"


async def sse(layout: Layout, model: str, path: Path, offset: int) -> AsyncIterator[str]:
    quiet, gone = 0.0, False
    while True:
        events, new_offset = await asyncio.to_thread(P.read_events, str(path), offset, READ_SLICE)
        for i, event in enumerate(events):
            yield sse_message(event, new_offset if i == len(events) - 1 else None)
            if isinstance(event, P.Finished):
                return
        if new_offset != offset:
            offset, quiet = new_offset, 0.0
            continue
        if gone:
            return
        gone = not await asyncio.to_thread(_live_log, layout, model, path)  # one more read, then end
        if not gone:
            await asyncio.sleep(POLL_S)
            quiet += POLL_S
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keepalive\n\n"
