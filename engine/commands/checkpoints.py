"""`packtrain-engine checkpoints list|delete|export`: the headless twin of the TUI's checkpoint screens.

list and delete go through engine.catalog, so they never import torch and apply exactly the
refusals the TUI applies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import catalog
from engine.commands.tables import format_loss, format_when, printed_json_or_empty, print_table
from engine.errors import UserError
from engine.paths import Layout
from engine.pretrained import BASE_FILE
from engine.units import format_bytes


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("checkpoints", help="list, delete or export checkpoints",
                       description="List, delete or export the checkpoints under checkpoints/.")
    cmds = p.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)

    ls = cmds.add_parser("list", help="every checkpoint of every model, newest first",
                         description="Eval and BPB are the newest `packtrain-engine eval` result of each checkpoint "
                                     "(Eval falls back to the loss of the run's own eval at that step).")
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
                                     "to a new folder loadable by AutoModelForCausalLM.from_pretrained. A LoRA "
                                     "run's checkpoint exports as a peft adapter folder, or with --merge as "
                                     "the base model with the adapter merged into its weights.")
    ex.add_argument("id", metavar="ID", help="display name or checkpoint folder")
    ex.add_argument("out", type=Path, metavar="OUT_DIR", help="new folder to create")
    ex.add_argument("--merge", action="store_true",
                    help="LoRA runs: merge the adapter into the base (needs the base model) instead of "
                         "writing a peft adapter folder")
    ex.set_defaults(handler=run_export)


def run_list(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    entries = catalog.list_checkpoints(layout)
    if printed_json_or_empty(entries, as_json=args.json, empty=f"No checkpoints in {layout.checkpoints_root}"):
        return 0
    rows = [{"Checkpoint": e.display_name, "Step": f"{e.step:,}", "Loss": format_loss(e.loss),
             "Eval": format_loss(e.kept_eval["loss"] if e.kept_eval else e.eval_loss),
             "BPB": format_loss(e.kept_eval["bpb"] if e.kept_eval else None), "Saved": format_when(e.saved_at),
             "Dataset": e.dataset or "-",
             "Seqs": f"{e.sequences:,}" if e.sequences is not None else "-", "Size": format_bytes(e.size_bytes),
             "Status": _status(e)} for e in entries]
    print_table(f"Checkpoints in {layout.checkpoints_root}", rows, right=RIGHT, drop_order=DROP_ORDER)
    return 0


RIGHT = {"Step", "Loss", "Eval", "BPB", "Seqs", "Size"}
DROP_ORDER = ("BPB", "Eval", "Dataset", "Seqs", "Saved", "Size", "Loss")  # first to go on a narrow terminal


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
    if (checkpoint / BASE_FILE).is_file():
        from engine.backends.torch_finetune import export_adapter, export_merged

        out = export_hf(checkpoint, target, export_merged if args.merge else export_adapter)
        print(f"Exported {'the merged model' if args.merge else 'the LoRA adapter'} to {out}")
        return 0
    out = export_hf(checkpoint, target)
    print(f"Exported to {out}" + (" (a full model: nothing to merge)" if args.merge else ""))
    return 0


def _status(e: catalog.CheckpointEntry) -> str:
    if not e.valid:
        return f"invalid: {e.reason}"
    tags = ["latest"] if e.is_latest else []
    if e.is_best:
        tags.append("best")
    if e.running:
        tags.append("running")
    return ", ".join(tags) or "valid"
