"""`packtrain-engine`: the headless entry point. Every TUI action has a command here.

Each concern registers its own subcommands (engine.cache.commands, engine.commands); building the
parser imports no torch, so `--help` and the quick commands stay fast. Handlers import heavy
libraries themselves. A UserError anywhere becomes one `error: ...` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from engine.errors import Parser, UserError, os_error_line
from engine.paths import Layout, check_root


def build_parser() -> argparse.ArgumentParser:
    from engine import commands
    from engine.cache import commands as cache_commands

    parser = Parser(
        prog="packtrain-engine",
        description="Build packed token caches and train decoder-only transformers from them.",
    )
    parser.add_argument("--root", default=None, help="data root holding cache/, checkpoints/, training_logs/ "
                        "(default: $PACKTRAIN_HOME or the current directory)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cache_commands.add_parsers(sub)
    commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root is not None:
        os.environ["PACKTRAIN_HOME"] = os.path.abspath(args.root)
    try:
        check_root(Layout.resolve(), writable=False)
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return 0
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
