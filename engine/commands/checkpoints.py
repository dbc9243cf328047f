"""`packtrain-engine checkpoints list|delete|export`: the headless twin of the TUI's checkpoint screens.

list and delete go through engine.catalog, so they never import torch and apply exactly the
refusals the TUI applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine import catalog
from engine.errors import UserError
from engine.paths import Layout
from engine.units import format_bytes


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("checkpoints", help="list, delete or export checkpoints",
                       description="List, delete or export the checkpoints under checkpoints/.")
    cmds = p.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)

    ls = cmds.add_parser("list", help="every checkpoint of every model, newest first")
    ls.add_argument("--json", action="store_true", help="print a JSON list of checkpoint entries")
    ls.set_defaults(handler=run_list)

    rm = cmds.add_parser("delete", help="delete checkpoints (asks first unless --yes)",
                         description="Delete checkpoints by display name (<model>_checkpoint_<step>_run_<k>) "
                                     "or folder path. Only folders inside checkpoints/ are accepted; the latest "
                                     "checkpoint of a live engine and the one it resumed from are refused.")
    rm.add_argument("ids", nargs="+", metavar="ID", help="display name or checkpoint folder")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(handler=run_delete)

    ex = cmds.add_parser("export", help="copy a checkpoint as a plain Hugging Face model folder",
                         description="Write weights, config and tokenizer (no optimizer or trainer state) "
                                     "to a new folder loadable by AutoModelForCausalLM.from_pretrained.")
    ex.add_argument("id", metavar="ID", help="display name or checkpoint folder")
    ex.add_argument("out", type=Path, metavar="OUT_DIR", help="new folder to create")
    ex.set_defaults(handler=run_export)


def run_list(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    entries = catalog.list_checkpoints(layout)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"No checkpoints in {layout.checkpoints_root}")
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = [{"Checkpoint": e.display_name, "Step": f"{e.step:,}", "Loss": _loss(e.loss), "Eval": _loss(e.eval_loss),
             "Saved": _when(e.saved_at), "Dataset": e.dataset or "-",
             "Seqs": f"{e.sequences:,}" if e.sequences is not None else "-", "Size": format_bytes(e.size_bytes),
             "Status": _status(e)} for e in entries]
    console = Console(width=None if sys.stdout.isatty() else 1000)  # piped: natural width, no ellipses
    columns = _fit_columns(rows, console.width)
    table = Table(title=f"Checkpoints in {layout.checkpoints_root}", box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, justify="right" if column in RIGHT else "left",
                         no_wrap=column != "Status", overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    return 0


RIGHT = {"Step", "Loss", "Eval", "Seqs", "Size"}
DROP_ORDER = ("Eval", "Dataset", "Seqs", "Saved", "Size", "Loss")  # first to go on a narrow terminal


def _fit_columns(rows: list[dict[str, str]], width: int) -> list[str]:
    """Columns that fit `width` without cutting the checkpoint name; Status may wrap."""
    columns = list(rows[0])
    natural = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    natural["Status"] = min(natural["Status"], 12)
    for victim in (None, *DROP_ORDER):
        if victim is not None:
            columns.remove(victim)
        if sum(natural[c] + 3 for c in columns) <= width:
            break
    return columns


def run_delete(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    entries = catalog.plan_delete(layout, args.ids)
    total = sum(e.size_bytes for e in entries)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("refusing to delete without --yes: stdin is not a terminal to confirm on")
        for e in entries:
            print(f"  {e.display_name}  ({format_bytes(e.size_bytes)}){'  [latest]' if e.is_latest else ''}")
        answer = input(f"Delete {len(entries)} checkpoint(s), freeing {format_bytes(total)}? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("Nothing deleted.")
            return 1
    deleted = catalog.delete_checkpoints(layout, entries)
    for name in deleted:
        print(f"Deleted {name}")
    print(f"Freed {format_bytes(total)}")
    for model in sorted({e.model for e in entries if e.is_latest}):
        now = catalog.read_latest(layout, model)
        print(f"{model}: latest is now {now}" if now else f"{model}: no checkpoints left")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from engine.checkpoint import export_hf

    layout = Layout.resolve()
    checkpoint = catalog.find_checkpoint(layout, args.id)
    target = args.out.expanduser().absolute()
    for managed in (layout.checkpoints_root, layout.cache_root):
        if target == managed or managed in target.parents or managed.resolve() in target.resolve().parents:
            raise UserError(f"refusing to export into {managed}: the engine manages that folder; choose one outside it")
    out = export_hf(checkpoint, target)
    print(f"Exported to {out}")
    return 0


def _loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%m-%d %H:%M", time.localtime(ts))


def _status(e: catalog.CheckpointEntry) -> str:
    if not e.valid:
        return f"invalid: {e.reason}"
    tags = ["latest"] if e.is_latest else []
    if e.running:
        tags.append("running")
    return ", ".join(tags) or "valid"
