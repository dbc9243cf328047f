"""Placeholder until its owner lands it."""


def add_parsers(sub) -> None:
    pass
