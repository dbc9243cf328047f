"""`packtrain`: start the TUI on a data root (--root, $PACKTRAIN_HOME, or the current directory)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.config import RunConfig
from engine.errors import Parser, UserError
from engine.paths import Layout, check_root


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="packtrain", description="Train language models from a terminal: start, watch, detach, resume."
    )
    parser.add_argument("--root", default=None, help="data root holding cache/, checkpoints/, training_logs/ "
                        "(default: $PACKTRAIN_HOME or the current directory)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run YAML whose values pre-fill the new-training form")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layout = check_root(Layout.resolve(args.root), writable=True)
        base = RunConfig.load(args.config).validate() if args.config else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    from app.app import PacktrainApp

    PacktrainApp(layout, base_config=base).run()
    return 0
