"""Model-name suggestions and checks, shared by the CLI and the TUI's naming screen."""

from __future__ import annotations

import re

from engine.errors import UserError
from engine.paths import NAME_RE, Layout, check_name


def format_params(n: int) -> str:
    """415_000_000 -> '415M', 1_240_000_000 -> '1.2B': the size tag used in names."""
    if n >= 1_000_000_000:
        v = n / 1e9
        return f"{v:.1f}B".replace(".0B", "B")
    if n >= 1_000_000:
        return f"{round(n / 1e6)}M"
    return f"{max(1, round(n / 1e3))}K"


def dataset_tag(dataset: str) -> str:
    """'HuggingFaceFW/fineweb-edu' -> 'FineWebEdu'-style tag; keeps names short and legal."""
    base = dataset.rstrip("/").split("/")[-1]
    base = re.sub(r"\.(jsonl|json|parquet|csv|arrow|txt|md)$", "", base)
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", base) if p]
    tag = "".join(p if any(c.isupper() for c in p) else p.capitalize() for p in parts)
    known = {"Fineweb": "FineWeb", "FinewebEdu": "FineWebEdu", "Tinystories": "TinyStories", "Stdlib": "Stdlib"}
    return known.get(tag, tag)[:24] or "Data"


def existing_names(layout: Layout) -> set[str]:
    root = layout.checkpoints_root
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name)}


def suggest_names(params: int, dataset: str, seq_len: int, taken: set[str] | None = None) -> list[str]:
    """Seed-style suggestions, e.g. 415M_FineWeb_512, experiment_415M_FineWeb_512, modern_llm_415M,
    test_415M; a taken name gets the next free _2, _3, ... suffix instead of being dropped."""
    taken = taken or set()
    size, tag = format_params(params), dataset_tag(dataset)
    out: list[str] = []
    for base in (f"{size}_{tag}_{seq_len}", f"experiment_{size}_{tag}_{seq_len}", f"modern_llm_{size}", f"test_{size}"):
        name, k = base, 2
        while name in taken or name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name[:64])
    return out


def validate_new_name(name: str, layout: Layout) -> str:
    check_name(name, "model name")
    if name in existing_names(layout):
        raise UserError(f"model name {name!r} is already used in {layout.checkpoints_root}")
    return name
