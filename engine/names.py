"""Model-name suggestions and the rule for when a name is taken, shared by the CLI and the TUI's
naming screen, so neither refuses a name the other accepts."""

from __future__ import annotations

import re

from engine.control import engine_lock_held, live_engine
from engine.errors import UserError
from engine.paths import CHECKPOINT_RE, Layout, check_name, is_name


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


def taken_reason(layout: Layout, name: str) -> str | None:
    """Why a new run may not take `name`, or None when it may. A model is taken once it has a
    checkpoint (there is something to resume) or while an engine trains it. A folder without
    checkpoints (a run that died before its first save, a config the TUI saved) is free: a new run
    there becomes its next run number."""
    model_dir = layout.model_dir(name)
    try:
        has_checkpoint = any(CHECKPOINT_RE.match(p.name) for p in model_dir.iterdir())
    except OSError:
        has_checkpoint = False
    if has_checkpoint:
        return (f"model {name!r} already exists in {layout.checkpoints_root}; continue it with "
                f"`packtrain-engine resume {name}` or choose another name")
    if engine_lock_held(layout, name):
        engine = live_engine(layout, name)
        return f"another engine is already training {name!r}" + (f" (pid {engine.pid})" if engine else "")
    return None


def taken_names(layout: Layout) -> set[str]:
    """Every model name on disk that a new run may not take (see taken_reason)."""
    root = layout.checkpoints_root
    try:
        names = [p.name for p in root.iterdir() if p.is_dir() and is_name(p.name)]
    except OSError:
        return set()
    return {name for name in names if taken_reason(layout, name) is not None}


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
    """The name a new run may take; UserError with the reason otherwise."""
    check_name(name, "model name")
    reason = taken_reason(layout, name)
    if reason is not None:
        raise UserError(reason)
    return name
