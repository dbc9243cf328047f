"""Engine subcommands other than `cache`: one module per concern, each with add_parsers(sub)."""

from __future__ import annotations

import argparse

from engine.commands import checkpoints, info, operate, train, use


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    train.add_parsers(sub)
    checkpoints.add_parsers(sub)
    info.add_parsers(sub)
    operate.add_parsers(sub)
    use.add_parsers(sub)
