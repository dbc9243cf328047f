"""Run assembly: everything a new run or a resumed one needs, checked, then handed to the same loop.

A new run picks a backend, opens (or builds) its cache, builds a fresh model and chooses a name; a
resume reads run.json and a verified checkpoint, rebuilds the model from its config.json, restores
weights, optimizer and counters, and refuses when the data under it changed. Both end in a Trainer
(engine.train). Framework-free: the backend is loaded by name (engine.backends).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.backends import choose, load
from engine.backends.base import Backend
from engine.catalog import DISPLAY_RE, checkpoint_dirs, display_name, model_names
from engine.checkpoint import Checkpointer
from engine import oom, pretrained
from engine.config import RunConfig
from engine.data import DataOrder, check_resume_cache, rows_in_budget
from engine.elastic import Elastic
from engine.errors import UserError
from engine.model_config import llama_config, read_config_json
from engine.names import suggest_names, taken_names, validate_new_name
from engine.paths import Layout, check_name
from engine.run_log import RunLog
from engine.schedule import plan_schedule
from engine.state import TRAINER_STATE, Fallback, RunFile, RunRecord, read_file
from engine.train import Options, Start, Trainer, counters


def read_run_json(layout: Layout, model: str) -> RunFile:
    path = layout.run_json(model)
    if not path.exists():
        raise UserError(f"no run named {model!r} in {layout.checkpoints_root} (missing {path.name})")
    return RunFile.from_dict(read_file(path), path)


def next_run_number(history: list[RunRecord]) -> int:
    return max((r.run for r in history), default=0) + 1


def run_log(opts: Options, is_main: bool) -> RunLog:
    return RunLog(events=opts.events, enabled=is_main, quiet=opts.quiet)


def open_backend(cfg: RunConfig, layout: Layout) -> tuple[Backend, str]:
    """The framework this run trains with on this machine, and a log line saying which and why."""
    choice = choose(cfg.train.backend)
    backend = load(choice.name)(cfg, layout)
    sharded = ""
    if cfg.train.parallel == "fsdp":  # refused before any cache or model work
        if not backend.shards:
            raise UserError(f"the {backend.name} backend does not shard models (train.parallel fsdp); "
                            "use --backend torch under torchrun, or --parallel ddp")
        if not backend.dist.enabled:
            raise UserError("train.parallel fsdp shards the model across processes: start 2 or more with "
                            "torchrun, or train with --parallel ddp")
        sharded = f", FSDP over {backend.dist.world_size} processes"
    return backend, f"Backend: {choice.name} on {backend.device}, {backend.precision}{sharded} ({choice.reason})"


def check_finetune(cfg: RunConfig, backend: Backend) -> None:
    """Fine-tuning this backend cannot do is refused before any cache or model work."""
    if cfg.model.init_from and not backend.fine_tunes:
        raise UserError(f"the {backend.name} backend trains from scratch only; fine-tune with --backend torch")
    pretrained.check_method(cfg.model.method, backend.device)


def open_cache(cfg: RunConfig, layout: Layout, backend: Backend, log: RunLog, *, workers: int | None = None,
               recorded: str | None = None) -> Any:
    """The run's cache: an explicit path, else the one its data config names; a missing cache is
    built first when the config names a source (rank 0 builds, the others wait)."""
    from engine.cache.naming import cache_path_for
    from engine.cache.metadata import METADATA_FILE
    from engine.cache.reader import PackedCache
    from engine.cache.tokenizer import parse_tokenizer_spec

    d = cfg.data
    path = Path(d.cache).expanduser() if d.cache else cache_path_for(d, layout)
    if recorded and not (path / METADATA_FILE).is_file() and Path(recorded).is_dir():
        path = Path(recorded)  # the root moved or was renamed: the checkpoint knows where it trained
    if not (path / METADATA_FILE).is_file():
        if d.cache or not d.source or recorded:
            raise UserError(f"no packed cache at {path}; build it with `packtrain-engine cache build`")
        if backend.dist.is_main:
            from engine.cache.build import build_cache  # its sources and workers only when building

            log.info(f"Building cache {path} from {d.source} ...")
            build_cache(d, layout, workers=workers, on_event=log.emit)
        backend.barrier()
    cache = PackedCache(path, cache_bytes=cfg.train.shuffle_buffer_mb << 20)
    if cache.flagged and not backend.trains_flags:
        raise UserError(f"cache {path} holds {cache.record_format} instruction data (loss masks, example boundaries), "
                        f"which the {backend.name} backend does not train; use --backend torch")
    spec = str((cache.meta.get("tokenizer") or {}).get("spec", ""))
    if d.cache:  # an explicit cache decides what the data is; the saved config says so too
        d.seq_len, d.tokenizer = cache.seq_len, spec or d.tokenizer
    elif not recorded and spec and spec != parse_tokenizer_spec(d.tokenizer).spec:
        raise UserError(f"cache {path} was built with tokenizer {spec!r}, not {d.tokenizer!r}: pass "
                        f"--tokenizer {spec} to train on it, or another --dataset-name to build a new one")
    return cache


def token_ids(cache: Any) -> dict[str, int]:
    """bos/eos/pad ids of the cache's tokenizer, for the model config and so for generate()."""
    from engine.cache.tokenizer import special_token_ids

    return special_token_ids(cache.tokenizer_dir, cache.eos_id)


def choose_name(cfg: RunConfig, layout: Layout, n_params: int, dataset: str, seq_len: int, prefix: str = "") -> str:
    """The given name unless it is taken (engine.names.taken_reason, the TUI's rule too); else the
    first free suggestion."""
    if cfg.name:
        return validate_new_name(cfg.name, layout)
    taken = taken_names(layout)
    base = prefix + suggest_names(n_params, dataset, seq_len)[0]
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def new_run(cfg: RunConfig, layout: Layout, opts: Options, *, workers: int | None = None,
            name_prefix: str = "", auto_plan: dict[str, Any] | None = None) -> Trainer:
    """Everything a fresh run needs, checked before anything about the run is written."""
    cfg.validate()
    if cfg.name:
        validate_new_name(cfg.name, layout)  # now, not after a whole cache was built for it
    folder = pretrained.prepare(cfg) if cfg.model.init_from else None
    backend, backend_line = open_backend(cfg, layout)
    check_finetune(cfg, backend)
    dist = backend.dist
    log = run_log(opts, dist.is_main)
    log.info(backend_line)
    cache = open_cache(cfg, layout, backend, log, workers=workers)
    order = DataOrder.start(cfg.train.seed, cache.chunk_sizes, cfg.data.eval_chunks,
                            rows_in_budget(cache.cache_bytes, cache.seq_len, cache.dtype, cache.flagged))
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dist.world_size
    if global_batch > order.n_train_sequences:
        raise UserError(
            f"a step needs {global_batch:,} sequences (micro_batch {cfg.train.micro_batch:,} x grad_accum "
            f"{cfg.train.grad_accum:,} x {dist.world_size} processes) but {cache.path} holds only "
            f"{order.n_train_sequences:,} training sequences; lower --micro-batch or --grad-accum, or grow the cache")
    if folder is None:
        backend.build(llama_config(cfg.model, cache.vocab_size, cache.seq_len, token_ids(cache)), cfg.train)
    else:
        pretrained.check_vocab(folder, cache.vocab_size)
        backend.build_pretrained(folder, cfg.model, cfg.train,
                                 pretrained.base_record(cfg.model, folder) if cfg.model.adapter else None)
    cfg.name = backend.broadcast(choose_name(cfg, layout, backend.n_params, cache.dataset_name, cache.seq_len,
                                             name_prefix) if dist.is_main else None)
    schedule, warnings = plan_schedule(cfg.train, order.n_train_sequences, global_batch, cache.seq_len)
    for w in warnings:
        log.warn(w)
    run_file = read_run_json(layout, cfg.name) if layout.run_json(cfg.name).exists() else RunFile(config={})
    fallback = take_pending(cfg, run_file, backend)
    start = Start(cfg=cfg, model_name=cfg.name, run=next_run_number(run_file.runs), schedule=schedule, order=order,
                  cache_sequences=cache.n_sequences, history=run_file.runs, auto_plan=auto_plan, fallback=fallback)
    checkpointer = Checkpointer(layout, cfg.name, keep_last=cfg.train.keep_last, log=log.info)
    return Trainer(start, layout=layout, backend=backend, cache=cache, checkpointer=checkpointer, log=log, opts=opts)


# Settings a resume may change: how long and how often, and how the same math is executed.
RESUMABLE = {
    "train": {"max_steps", "max_tokens", "epochs", "epoch_fraction", "save_interval", "keep_last", "log_interval",
              "eval_interval", "eval_batches", "growth_check_interval", "precision", "device", "compile",
              "grad_checkpointing", "micro_batch", "grad_accum", "estimated_total_sequences", "backend", "parallel",
              "sample_every", "sample_prompt", "sample_tokens", "sample_temperature", "tracker",
              "early_stop_patience", "divergence_patience", "divergence_lr_factor"},
    "data": {"cache"},
}


def check_overrides(saved: RunConfig, wanted: RunConfig) -> None:
    before, after = saved.to_dict(), wanted.to_dict()
    if before["name"] != after["name"]:
        raise UserError("a resumed run keeps its name; copy the checkpoint folder to train it under another name")
    for section in ("model", "data", "train"):
        for key, value in after[section].items():
            if value != before[section][key] and key not in RESUMABLE.get(section, set()):
                raise UserError(f"cannot change {section}.{key} when resuming ({before[section][key]!r} -> {value!r}): "
                                "it would change what the run computes; start a new run instead")


def model_of(ref: str, layout: Layout) -> tuple[str, str]:
    """(model, checkpoint reference) for a model name or folder, a display name or a checkpoint folder."""
    m = DISPLAY_RE.match(ref)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "trainer_state.json").exists():
        path = path.resolve()
        if path.parent.parent != layout.checkpoints_root:
            raise UserError(f"{path} is not under {layout.checkpoints_root}; pass --root to its packtrain root")
        return path.parent.name, str(path)
    if path.is_dir() and (path / "run.json").exists():
        return path.resolve().name, path.resolve().name
    if m and not layout.run_json(ref).exists():
        return m.group("model"), ref
    return check_name(ref, "model name"), ref


def resume_run(ref: str, layout: Layout, opts: Options, override: Any = None, *,
               reset_optimizer: bool = False) -> Trainer:
    """Rebuild the exact training state a checkpoint holds; refuse if its data changed underneath.
    Everything is checked before the Trainer exists, so a refused resume writes nothing.
    `reset_optimizer` carries the weights only (fresh AdamW moments), e.g. onto another optimizer layout."""
    name, ref = model_of(ref, layout)
    run_file = read_run_json(layout, name)
    saved_cfg = RunConfig.from_dict(run_file.config)
    saved_cfg.name = saved_cfg.name or name
    cfg = override(RunConfig.from_dict(saved_cfg.to_dict())) if override else saved_cfg
    check_overrides(saved_cfg, cfg)
    cfg.validate()
    backend, backend_line = open_backend(cfg, layout)
    check_finetune(cfg, backend)
    dist = backend.dist
    log = run_log(opts, dist.is_main)
    log.info(backend_line)
    checkpointer = Checkpointer(layout, name, keep_last=cfg.train.keep_last, log=log.info)
    path = Path(backend.broadcast(str(checkpointer.resolve(ref)) if dist.is_main else None))
    state = checkpointer.open(path)  # the files' hashes and the whole state's shape, before anything is built
    source = path / TRAINER_STATE
    backend.check_rng_state(state.rng, source)
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dist.world_size
    if state.global_batch != global_batch:
        raise UserError(
            f"global batch changed: the run used {state.global_batch} sequences per step, now "
            f"{cfg.train.micro_batch} x {cfg.train.grad_accum} x {dist.world_size} = {global_batch}; "
            "keep micro_batch x grad_accum x processes the same"
        )
    cache = open_cache(cfg, layout, backend, log, recorded=state.cache.path)
    order = DataOrder.restore(state.data, state.growth_events, cache.chunk_sizes)
    if state.cursor >= order.n_train_sequences or any(e.epoch > state.epoch for e in order.events):
        raise UserError(f"{source}: field 'cursor' ({state.cursor:,} in epoch {state.epoch}) is not a position in "
                        f"this run's data ({order.n_train_sequences:,} training sequences per epoch)")
    check_resume_cache(asdict(state.cache), cache, cache.manifest_hash(order.known_chunks))
    if cfg.model.init_from:
        folder, base = pretrained.base_folder(cfg.model, path)
        backend.build_pretrained(folder, cfg.model, cfg.train, base)
    else:
        backend.build({**read_config_json(path), **token_ids(cache)}, cfg.train)
    checkpointer.load(path, backend, optimizer=not reset_optimizer)
    fallback = take_pending(cfg, run_file, backend)
    if state.backend != backend.name:
        log.info(f"Continuing a {state.backend} checkpoint on {backend.name}: the weights"
                 + (" carry, the optimizer starts fresh" if reset_optimizer else " and AdamW state carry")
                 + f"; losses follow a {state.backend} resume only to float tolerance")
    elif reset_optimizer:
        log.info("Optimizer state reset (--reset-optimizer): the weights carry, AdamW moments start at zero")
    start = Start(cfg=cfg, model_name=name, run=next_run_number(run_file.runs), order=order, elapsed_s=state.elapsed_s,
                  resumed_from=display_name(name, state.step, state.run), history=run_file.runs, fallback=fallback,
                  **counters(state))
    return Trainer(start, layout=layout, backend=backend, cache=cache, checkpointer=checkpointer, log=log, opts=opts)


def take_pending(cfg: RunConfig, run_file: RunFile, backend: Backend) -> Fallback | None:
    """A run starts from the rung a rank took under torchrun before the group stopped (engine.oom)."""
    fallback = run_file.pending_fallback
    if fallback is not None:
        oom.catch_up(cfg.train, fallback, backend)
    return fallback


def continues_after_oom(cfg: RunConfig, layout: Layout) -> str | None:
    """The run this `train` continues as `resume` does, when it is torchrun's restart of a group one
    of whose ranks ran out of memory once the run had a checkpoint: the run (cfg.name, or any when the
    command names none) whose run.json holds a pending fallback from this job. The job id is the same
    in every attempt and on every node; torchrun's restart count is per node, so it decides nothing.
    With no checkpoint yet the name is free, and a new run there begins with the fallback too."""
    job = Elastic.from_env().job
    if job is None:
        return None
    for name in [cfg.name] if cfg.name else model_names(layout):
        if not layout.run_json(name).is_file():
            continue
        try:
            pending = read_run_json(layout, name).pending_fallback
        except UserError:
            if cfg.name:
                raise
            continue  # another model's damaged run.json is not this command's run, nor its problem
        if pending is not None and pending.job == job and checkpoint_dirs(layout.model_dir(name)):
            return name
    return None


def run_to_end(make: Any) -> int:
    """Build a trainer with `make()` and run it; the process group is torn down either way."""
    trainer = None
    try:
        trainer = make()
        code = trainer.run()
        # Ranks leave together: a rank that tears the gloo group down while a worker thread still
        # drops its last collective deadlocks on the GIL (pytorch#56297); the wait lets it finish.
        trainer.backend.barrier()
        return code
    finally:
        if trainer is not None:
            trainer.backend.shutdown()
