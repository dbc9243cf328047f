"""`packtrain`: start the TUI on a data root (--root, $PACKTRAIN_HOME, or the current directory)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from engine.config import RunConfig
from engine.errors import Parser, UserError
from engine.paths import Layout


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="packtrain", description="Train language models from a terminal: start, watch, detach, resume."
    )
    parser.add_argument("--root", default=None, help="data root holding cache/, checkpoints/, training_logs/ "
                        "(default: $PACKTRAIN_HOME or the current directory)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run YAML whose values pre-fill the new-training form")
    return parser


def check_root(layout: Layout) -> Layout:
    """Refuse a root that can never hold data before any screen shows; it may not exist yet."""
    anchor = layout.root
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"cannot use {layout.root} as the data root: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot use {layout.root} as the data root: {anchor} is not writable")
    return layout


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layout = check_root(Layout.resolve(args.root))
        base = RunConfig.load(args.config).validate() if args.config else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    from app.app import PacktrainApp

    PacktrainApp(layout, base_config=base).run()
    return 0
