"""Steering and watching from a shell: `control`, `runs list`, `logs`, `report` and `serve`.

The CLI twins of what the TUI does (the same command channel, catalog and run logs), so a run can be
watched and steered over SSH, from cron or from a script. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

from engine import catalog
from engine import protocol as P
from engine.commands.tables import format_loss, format_when, printed_json_or_empty, print_table
from engine.control import SPELLINGS, live_engine, send_to_live
from engine.errors import UserError
from engine.paths import Layout, check_name
from engine.run_log import human

FOLLOW_POLL_S = 0.25
READ_SLICE = 4 << 20
TOKEN_ENV = "PACKTRAIN_API_TOKEN"


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    ctl = sub.add_parser("control", help="send save, stop, pause ... to the live engine training a model",
                         description="Send a command to the live engine training NAME (taken between optimizer "
                                     "steps): save a checkpoint now, stop (save, then exit), stop at the next "
                                     "scheduled checkpoint, pause, or resume after a pause.")
    ctl.add_argument("name", metavar="NAME", help="model name")
    ctl.add_argument("command", choices=list(SPELLINGS), metavar="|".join(SPELLINGS))
    ctl.set_defaults(handler=run_control)

    runs = sub.add_parser("runs", help="list training runs", description="List training runs from training_logs/.")
    runs_cmds = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    ls = runs_cmds.add_parser("list", help="every run of every model, newest first")
    ls.add_argument("--json", action="store_true", help="print a JSON list of run entries")
    ls.set_defaults(handler=run_runs_list)

    logs = sub.add_parser("logs", help="print a run's event log as human lines",
                          description="Print a run's event log (training_logs/<NAME>_run_<K>.jsonl) as the lines "
                                      "the engine prints to a terminal.")
    logs.add_argument("name", metavar="NAME", help="model name")
    logs.add_argument("--run", type=int, default=None, metavar="K", help="run number (default: the newest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing new events until the run finishes (or Ctrl-C)")
    logs.set_defaults(handler=run_logs)

    rep = sub.add_parser("report", help="write plots and an HTML report of a model's runs",
                         description="Write checkpoints/<NAME>/report/: PNG plots (loss, LR, tok/s, memory, grad "
                                     "norm, document lengths) and one self-contained report.html. Needs the "
                                     "'report' extra (matplotlib).")
    rep.add_argument("name", metavar="NAME", help="model name")
    rep.set_defaults(handler=run_report)

    srv = sub.add_parser("serve", help="serve the HTTP API (FastAPI on uvicorn)",
                         description="Serve runs, checkpoints, metrics and live events over HTTP, and accept "
                                     "start, stop, save, pause, resume and delete commands. Binds 127.0.0.1 by "
                                     f"default; any other address needs a token (--token or ${TOKEN_ENV}), and "
                                     "with a token every request must send `Authorization: Bearer <token>`. "
                                     "Needs the 'serve' extra (fastapi, uvicorn).")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    srv.add_argument("--token", default=None, help=f"bearer token every request must carry (default ${TOKEN_ENV})")
    srv.set_defaults(handler=run_serve)


# --- control, runs, logs ------------------------------------------------------------------------------


def run_control(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    name = check_name(args.name, "model name")
    info = send_to_live(layout, name, args.command, sender=f"cli:{os.getpid()}")
    print(f"Sent {args.command} to the engine training {name} (pid {info.pid}); it acts between optimizer steps.")
    return 0


def run_runs_list(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    runs = catalog.list_runs(layout)
    if printed_json_or_empty(runs, as_json=args.json, empty=f"No runs in {layout.logs_root}"):
        return 0
    rows = [{"Model": r.model, "Run": str(r.run), "Started": format_when(r.started), "Step": _progress(r),
             "Loss": format_loss(r.last_loss), "From": r.resumed_from or "new", "Status": _run_status(r)}
            for r in runs]
    print_table(f"Runs in {layout.logs_root}", rows, right={"Run", "Step", "Loss"},
                drop_order=("From", "Started", "Loss"))
    return 0


def _progress(r: catalog.RunEntry) -> str:
    step = "-" if r.last_step is None else f"{r.last_step:,}"
    return step if r.total_steps is None else f"{step}/{r.total_steps:,}"


def _run_status(r: catalog.RunEntry) -> str:
    if r.live:
        return f"running (pid {r.pid})"
    return r.finished or "ended without finishing"


def describe(event: P.Event) -> str | None:
    """One line for a person, or None for events only machines read. The engine's terminal wording,
    plus errors, which a live engine prints on stderr rather than as a line of its own."""
    if isinstance(event, P.Error):
        return f"error: {event.message}"
    return human(event)


def run_logs(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    name = check_name(args.name, "model name")
    logs = dict(catalog.run_logs(layout, name))
    if not logs:
        raise UserError(f"no runs of {name!r} in {layout.logs_root}")
    run = max(logs) if args.run is None else args.run
    if run not in logs:
        raise UserError(f"{name!r} has no run {run}; its runs are {', '.join(map(str, sorted(logs)))}")
    return follow_log(layout, name, logs[run], follow=args.follow)


def follow_log(layout: Layout, model: str, path: Path, *, follow: bool) -> int:
    """Print the log from its start; with `follow`, go on until a `finished` event, or until its
    engine is gone (killed: it will never write one)."""
    offset, gone = 0, False
    while True:
        events, new_offset = P.read_events(str(path), offset, READ_SLICE)
        for event in events:
            line = describe(event)
            if line is not None:
                print(f"{time.strftime('%m-%d %H:%M:%S', time.localtime(event.ts))}  {line}", flush=True)
            if isinstance(event, P.Finished):
                return 0
        if new_offset != offset:
            offset = new_offset
        elif gone:
            print(f"The engine of {path.name} is gone without finishing (killed or crashed).", file=sys.stderr)
            return 1
        elif not follow:
            return 0
        elif not _is_live(layout, model, path):
            gone = True  # one more read for what it wrote before it went
        else:
            time.sleep(FOLLOW_POLL_S)


def _is_live(layout: Layout, model: str, path: Path) -> bool:
    info = live_engine(layout, model)
    return info is not None and Path(info.log).name == path.name


# --- report -------------------------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    name = check_name(args.name, "model name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the report needs matplotlib: pip install 'packtrain[report]'") from None
    from engine.report import write_report

    path = write_report(layout, name)
    print(f"Report written: {path}")
    return 0


# --- serve --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise UserError(f"refusing to serve on {args.host} without a token: anyone who can reach it could start "
                        f"and delete runs; pass --token or set {TOKEN_ENV} (or bind 127.0.0.1)")
    try:
        import uvicorn

        from engine.api import create_app
    except ImportError:
        raise UserError("serve needs fastapi and uvicorn: pip install 'packtrain[serve]'") from None
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    sock.listen(128)  # connections queue from now on, so a client may connect once the line below is out
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(layout, token=token), log_level="warning",
                                           timeout_graceful_shutdown=3))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"Serving {layout.root} on http://{shown}:{port}/api"
          + (" (every request needs the bearer token)" if token else ""), flush=True)
    server.run(sockets=[sock])
    return 0
