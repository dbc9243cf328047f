"""`train`, `resume` and `demo`: the engine process that trains, streams events and obeys control.

Every config field is a flag named after it (engine.config), so a TUI form, a YAML file, run.json
and a shell line all say the same thing. Training imports its framework lazily: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from engine.cache.commands import check_workers
from engine.config import (
    DataConfig, RunConfig, add_config_flags, apply_config_flags, given_fields, with_default_lr,
)
from engine.errors import UserError
from engine.paths import Layout

DEMO = {
    "model": {"preset": "5M"},
    "data": {"source": "stdlib", "tokenizer": "bpe:4096", "seq_len": 128, "eval_chunks": 1},
    "train": {"micro_batch": 16, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 30, "max_steps": 300,
              "schedule": "cosine", "log_interval": 10, "eval_interval": 100, "eval_batches": 4,
              "save_interval": 100, "precision": "auto"},
}


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("train", help="train a model from a packed cache (building the cache first if needed)",
                       description="Train a new model. Flags mirror the config fields and override --config.")
    p.add_argument("--config", default=None, help="YAML or JSON run config (checkpoints/<name>/run.json works)")
    p.add_argument("--auto-plan", action="store_true",
                   help="run the planner first (see `plan`) and train with its winner, recorded in run.json")
    _common(p)
    _plan_flags(p)
    add_config_flags(p)
    p.set_defaults(handler=cmd_train)

    pl = sub.add_parser("plan", help="dry-run candidate settings a few steps each and rank them by tok/s",
                        description="Measure micro_batch x grad_accum splits of the global batch, gradient "
                                    "checkpointing and compile (where supported) for a run config; candidates over "
                                    "the memory margin are rejected. Builds the cache first if it is missing.")
    pl.add_argument("--config", default=None, help="YAML or JSON run config, as for train")
    pl.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pl.add_argument("--workers", type=int, default=None, help="processes for building a missing cache")
    _plan_flags(pl)
    add_config_flags(pl)
    pl.set_defaults(handler=cmd_plan)

    r = sub.add_parser("resume", help="continue a run from its newest valid checkpoint (or a given one)",
                       description="Resume NAME (newest valid checkpoint), a display name "
                                   "<model>_checkpoint_<step>_run_<k>, or a checkpoint folder. Only settings that "
                                   "keep the computation the same may change (length, intervals, precision, "
                                   "device, micro_batch x grad_accum at the same global batch).")
    r.add_argument("ref", metavar="NAME|CHECKPOINT")
    r.add_argument("--reset-optimizer", action="store_true",
                   help="continue the weights with fresh AdamW state (when the saved optimizer state does not fit)")
    _common(r)
    add_config_flags(r)
    r.set_defaults(handler=cmd_resume)

    d = sub.add_parser("demo", help="offline end to end: stdlib sample, BPE tokenizer, cache, a small model, a checkpoint",
                       description="Train a ~5M model on the bundled Python stdlib sample for a few minutes on CPU. "
                                   "Any config flag overrides the demo's settings.")
    _common(d)
    add_config_flags(d)
    d.set_defaults(handler=cmd_demo)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", action="store_true", help="print engine events as JSON lines instead of progress lines")
    p.add_argument("--workers", type=int, default=None, help="processes for building a missing cache")
    p.add_argument("--trace-data", default=None, metavar="FILE",
                   help="append the sequence ids each step trains on to FILE (one JSON line per step; "
                        "'.rank<r>' is added under torchrun)")


def _plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--margin", type=float, default=0.8, metavar="F",
                   help="planner: reject candidates above this fraction of the memory limit (default 0.8)")
    p.add_argument("--plan-steps", type=int, default=3, metavar="N", help="planner: timed steps per candidate (default 3)")


def check_plan_flags(args: argparse.Namespace) -> None:
    if not 0 < args.margin <= 1:
        raise UserError(f"--margin must be in (0, 1], got {args.margin}")
    if args.plan_steps < 1:
        raise UserError(f"--plan-steps must be a positive integer, got {args.plan_steps}")


def _options(args: argparse.Namespace) -> Any:
    from engine.tracking import Trackers
    from engine.train import Options

    return Options(events=args.events, trace_data=args.trace_data, sinks=[Trackers(Layout.resolve())])


def _check_common(args: argparse.Namespace) -> None:
    """The flags `_common` adds, before anything is imported or written."""
    check_trace_path(args.trace_data)
    check_workers(args.workers)


def check_trace_path(path: str | None) -> None:
    """--trace-data is first appended to at the first step: a path that cannot be is refused before
    the run writes its run.json, lock and log."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--trace-data {p} is a folder; give a file to append to")
    folder = p.parent
    if not folder.is_dir():
        raise UserError(f"--trace-data {p}: the folder {folder} does not exist")
    if not os.access(p if p.exists() else folder, os.W_OK):
        raise UserError(f"--trace-data {p}: permission denied")


def check_cache_agrees(data: DataConfig, given: set[str]) -> None:
    """An explicit --cache decides seq_len and the tokenizer; a value the user also gave for them
    must agree with it rather than be silently replaced. A missing cache is open_cache's refusal."""
    if not data.cache:
        return
    from engine.cache.metadata import load_metadata, metadata_path
    from engine.cache.tokenizer import parse_tokenizer_spec

    path = Path(data.cache).expanduser()
    if not metadata_path(path).is_file():
        return
    meta = load_metadata(path)
    if "data.seq_len" in given and data.seq_len != meta["seq_len"]:
        raise UserError(f"cache {path} holds sequences of {meta['seq_len']} tokens, not the seq_len {data.seq_len} "
                        "given; leave seq_len out to train on it")
    spec = meta["tokenizer"]["spec"]
    if "data.tokenizer" in given and parse_tokenizer_spec(data.tokenizer).spec != spec:
        raise UserError(f"cache {path} was built with tokenizer {spec!r}, not the {data.tokenizer!r} given; "
                        "leave tokenizer out to train on it")


def cmd_train(args: argparse.Namespace) -> int:
    raw = RunConfig.read(args.config) if args.config else {}
    # Every refusal that needs no cache comes before the framework import and before anything is written.
    cfg = apply_config_flags(RunConfig.from_dict(raw), args)  # refuses a malformed file before it is read further
    given = given_fields(raw, args)
    cfg = with_default_lr(cfg, given).validate()
    check_cache_agrees(cfg.data, given)
    _check_common(args)
    check_plan_flags(args)
    from engine.assemble import continues_after_oom, new_run, resume_run, run_to_end

    handed = continues_after_oom(cfg, Layout.resolve())
    if handed is not None:  # its run.json holds the run's config, with the fallback
        return run_to_end(lambda: resume_run(handed, Layout.resolve(), _options(args)))
    auto_plan = None
    if args.auto_plan:
        from engine.planner import choose, plan

        if cfg.name:  # refused now, not after the planner measured for it
            from engine.names import validate_new_name

            validate_new_name(cfg.name, Layout.resolve())
        result = plan(cfg, Layout.resolve(), steps=args.plan_steps, margin=args.margin, workers=args.workers,
                      opts=_options(args))
        cfg, auto_plan = choose(cfg, result), result.to_dict()
    return run_to_end(lambda: new_run(cfg, Layout.resolve(), _options(args), workers=args.workers,
                                      auto_plan=auto_plan))


def cmd_plan(args: argparse.Namespace) -> int:
    raw = RunConfig.read(args.config) if args.config else {}
    cfg = apply_config_flags(RunConfig.from_dict(raw), args).validate()
    check_cache_agrees(cfg.data, given_fields(raw, args))
    check_workers(args.workers)
    check_plan_flags(args)
    from engine.planner import choose, plan, table
    from engine.train import Options

    result = plan(cfg, Layout.resolve(), steps=args.plan_steps, margin=args.margin, workers=args.workers,
                  opts=Options(quiet=args.json))
    print(json.dumps(result.to_dict()) if args.json else table(result))
    choose(cfg, result)  # nothing fits: the table, then one error line and a failing exit
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    # Malformed flag values are refused before the framework import; resume_run checks them against the saved config.
    apply_config_flags(RunConfig(), args).validate()
    _check_common(args)
    from engine.assemble import resume_run, run_to_end

    return run_to_end(lambda: resume_run(args.ref, Layout.resolve(), _options(args),
                                         override=lambda cfg: apply_config_flags(cfg, args),
                                         reset_optimizer=args.reset_optimizer))


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = apply_config_flags(RunConfig.from_dict(DEMO), args).validate()
    check_cache_agrees(cfg.data, given_fields({}, args))
    _check_common(args)
    from engine.assemble import new_run, run_to_end

    return run_to_end(lambda: new_run(cfg, Layout.resolve(), _options(args), workers=args.workers, name_prefix="demo_"))
