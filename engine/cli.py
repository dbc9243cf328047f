"""`packtrain-engine`: the headless entry point. Every TUI action has a command here.

Each concern registers its own subcommands (engine.cache.commands, engine.commands); building the
parser imports no torch, so `--help` and the quick commands stay fast. Handlers import heavy
libraries themselves. A UserError anywhere becomes one `error: ...` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError
from engine.usage import Parser


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


def os_error_line(e: OSError) -> str:
    """The filesystem refused (a folder that is a file, a full disk, a read-only mount): the user can
    fix that, so it is one line rather than a traceback, naming the file in the way."""
    if e.filename and e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = Path(e.filename)
        while blocker != blocker.parent and not (blocker.exists() and not blocker.is_dir()):
            blocker = blocker.parent
        if blocker != blocker.parent:
            return f"{blocker} is a file where a folder is needed"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root is not None:
        os.environ["PACKTRAIN_HOME"] = os.path.abspath(args.root)
    try:
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
