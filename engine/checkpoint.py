"""Checkpoints that survive kill -9 and load anywhere: the directory commit, validation and rotation.

A checkpoint is a folder written as `.tmp-checkpoint_<step>-<id>/`, every file fsynced, MANIFEST.json
(sizes and xxh3 hashes of every other file) written last, then renamed to `checkpoint_<step>/` and
the parent fsynced. A crash leaves either the old set of checkpoints or the new one: a folder without
a manifest is never a committed checkpoint. `latest` is replaced atomically after the rename, and
rotation deletes only after that, so the newest committed checkpoint always survives.

The folder is a Hugging Face model folder as well (model.safetensors with HF names, config.json,
generation_config.json, tokenizer files): `AutoModelForCausalLM.from_pretrained(path)` loads it.
Optimizer state is flattened into optimizer.safetensors under `<param name>/<state key>`, and the
param groups go into trainer_state.json, so nothing is pickled and a checkpoint can be inspected,
re-sharded or loaded after the parameter order changed.

The tensors come from and go to a backend (engine.backends), so the same folder is written and read
by torch and by mlx; this module itself imports neither.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from engine.atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir, remove_stale_tmp
from engine.backends.base import Backend
from engine.catalog import (
    DELETE_PREFIX, MANIFEST, TRAINER_STATE, TRAINER_STATE_FORMAT, InvalidCheckpoint, check_sizes,
    checkpoint_dirs, checkpoint_problem, display_name, find_checkpoint, read_latest, read_manifest,
    read_trainer_state, remove_checkpoint_dir, write_latest,
)
from engine.config import TrainConfig
from engine.control import engine_lock_held, live_engine
from engine.errors import UserError
from engine.model_config import read_config_json
from engine.paths import CHECKPOINT_RE, Layout, checkpoint_dirname

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
HASH_ALGO = "xxh3_64"
SUPERSEDED_PREFIX = f"{TMP_PREFIX}superseded-"
# Files of ours a tokenizer folder must never overwrite, and weight files that are not tokenizer files.
RESERVED = {MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, GENERATION_FILE, TRAINER_STATE, MANIFEST}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")
# LlamaConfig fields that decide whether weights fit a model.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
HF_FILES_EXCLUDED = {OPTIMIZER_FILE, TRAINER_STATE, MANIFEST}


@dataclass
class SavedCheckpoint:
    path: Path
    display_name: str
    bytes: int
    seconds: float


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: RANK is set by torchrun before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def hash_file(path: Path, *, fsync: bool = False) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return f"{HASH_ALGO}:{h.hexdigest()}"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> str | None:
    """Full check before loading: manifest, sizes and every file's hash. None when intact."""
    try:
        manifest = read_manifest(path)
        check_sizes(path, manifest)
        for name, entry in manifest.items():
            if not entry["hash"].startswith(f"{HASH_ALGO}:"):
                raise InvalidCheckpoint(f"{name} uses unknown hash {entry['hash'].split(':')[0]!r}")
            if hash_file(path / name) != entry["hash"]:
                raise InvalidCheckpoint(f"{name} is corrupt (hash mismatch)")
    except InvalidCheckpoint as e:
        return str(e)
    return None


def export_hf(checkpoint: Path, out_dir: Path) -> Path:
    """A plain HF folder (weights, config, tokenizer; no optimizer or trainer state), committed with
    one rename so a half-written export never looks complete."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    problem = verify(checkpoint)
    if problem is not None:
        raise UserError(f"cannot export {checkpoint}: {problem}")
    if out_dir.exists() or out_dir.is_symlink():
        raise UserError(f"{out_dir} already exists; choose a new folder")
    created = out_dir  # the topmost folder this export creates: removed again if it fails
    while not created.parent.exists():
        created = created.parent
    if not created.parent.is_dir():
        raise UserError(f"cannot export to {out_dir}: {created.parent} is a file, not a folder")
    created_any = created != out_dir
    if not created_any:  # an export to this name that was killed: its half copy goes now
        for stale in out_dir.parent.glob(f"{TMP_PREFIX}{out_dir.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for name in read_manifest(checkpoint):
            if name not in HF_FILES_EXCLUDED:
                shutil.copyfile(checkpoint / name, tmp / name)
                fsync_file(tmp / name)
        fsync_dir(tmp)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_any:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot export to {out_dir}: {e.strerror or e}") from None
        raise
    return out_dir


class Checkpointer:
    """Saves, validates, rotates and loads the checkpoints of one model.

    Construction removes the temporaries a crashed save or delete left behind, but only on rank 0
    and only when this process is the model's live engine or no engine holds its lock. So it is safe
    to construct anywhere: a viewer, a second engine refused by the lock or another rank never
    removes a save in progress. The engine normally creates it after taking the EngineLock.
    """

    def __init__(self, layout: Layout, model_name: str, *, keep_last: int = 3,
                 log: Callable[[str], None] | None = None) -> None:
        if keep_last < 2:
            raise ValueError(f"keep_last must be at least 2, got {keep_last}")
        self.layout = layout
        self.model_name = model_name
        self.dir = layout.model_dir(model_name)
        self.keep_last = keep_last
        self.log = log or (lambda message: None)
        self._verified: dict[Path, int] = {}  # path -> MANIFEST mtime_ns of a full check that passed
        self._recover()

    # --- recovery --------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Undo an interrupted replace, then drop every `.tmp-*` in the model folder: half saves and
        deletes, and the temporaries of run.json, engine.json, latest or config.yaml writes."""
        if not self.dir.is_dir() or not self._may_clean():
            return
        keep = set()
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith(SUPERSEDED_PREFIX):
                target = self.dir / entry.name[len(SUPERSEDED_PREFIX):].rsplit("-", 1)[0]
                if CHECKPOINT_RE.match(target.name) and not target.exists():
                    try:  # crashed between moving the old one aside and the new in
                        os.rename(entry, target)
                        self.log(f"restored {target.name} from an interrupted replace")
                    except OSError:
                        keep.add(entry.name)  # the only copy: try again at the next start
        for removed in remove_stale_tmp(self.dir, keep=keep):
            self.log(f"removed {removed.name} left by an interrupted save or delete")

    def _may_clean(self) -> bool:
        """Rank 0 of the engine that holds (or could take) the lock; never a viewer beside a live engine."""
        if not is_main_process():
            return False
        engine = live_engine(self.layout, self.model_name)
        if engine is not None:
            return engine.pid == os.getpid()
        return not engine_lock_held(self.layout, self.model_name)

    # --- save ------------------------------------------------------------------------------------
    def save(self, *, step: int, backend: Backend, trainer_state: dict[str, Any], tokenizer_dir: Path | None = None,
             eval_loss: float | None = None, optimizer: bool = True) -> SavedCheckpoint:
        """Commit one checkpoint of `backend`'s model (and optimizer) at an optimizer-step boundary.
        Only rank 0 calls this."""
        if not is_main_process():
            raise RuntimeError("only rank 0 saves checkpoints")
        started = time.perf_counter()
        state = self._complete_state(step, trainer_state, eval_loss)
        opt_tensors: dict[str, Any] = {}
        if optimizer:
            opt_tensors, state["optimizer"] = backend.optimizer_state()
        state_bytes = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()  # fails before any write

        self.dir.mkdir(parents=True, exist_ok=True)
        name = checkpoint_dirname(step)
        tmp = self.dir / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        target, aside = self.dir / name, None
        try:
            backend.save_tensors(backend.weights(), tmp / MODEL_FILE, metadata={"format": "pt"})
            config = backend.model_config()
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            generation = backend.generation_config()
            if generation is not None:
                (tmp / GENERATION_FILE).write_text(generation, encoding="utf-8")
            if tokenizer_dir is not None:
                copy_tokenizer(Path(tokenizer_dir), tmp)
            if optimizer:
                backend.save_tensors(opt_tensors, tmp / OPTIMIZER_FILE)
            (tmp / TRAINER_STATE).write_bytes(state_bytes)
            manifest = {p.name: {"bytes": p.stat().st_size, "hash": hash_file(p, fsync=True)}
                        for p in sorted(tmp.iterdir())}
            atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
            if target.exists():  # same step saved again (e.g. stop right after a scheduled save)
                aside = self.dir / f"{SUPERSEDED_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, aside)
            os.rename(tmp, target)
            fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None and not target.exists():
                os.rename(aside, target)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        write_latest(self.layout, self.model_name, name)
        self._verified[target] = (target / MANIFEST).stat().st_mtime_ns
        self._rotate()
        return SavedCheckpoint(
            path=target, display_name=state["display_name"],
            bytes=sum(e["bytes"] for e in manifest.values()), seconds=time.perf_counter() - started,
        )

    def _complete_state(self, step: int, trainer_state: dict[str, Any], eval_loss: float | None) -> dict[str, Any]:
        """Fill the keys every reader relies on, so a sparse trainer_state still lists and resumes."""
        state = dict(trainer_state)
        run = state.get("run")
        state.update(format=TRAINER_STATE_FORMAT, model_name=self.model_name, step=int(step),
                     display_name=display_name(self.model_name, int(step), run))
        state.setdefault("saved_at", time.time())
        if eval_loss is not None:
            state["eval_loss"] = float(eval_loss)
        state.setdefault("eval_loss", None)
        return state

    def _rotate(self) -> None:
        """Keep the last N intact checkpoints, the best by eval loss and whatever `latest` names;
        torn folders are left for the user to inspect (they list as invalid)."""
        intact = [(step, path) for step, path in checkpoint_dirs(self.dir) if checkpoint_problem(path) is None]
        keep = {path for _, path in intact[: self.keep_last]}
        scored = [(loss, step, path) for step, path in intact
                  if isinstance(loss := (read_trainer_state(path) or {}).get("eval_loss"), (int, float))
                  and math.isfinite(loss)]
        if scored:
            keep.add(min(scored)[2])
        latest = read_latest(self.layout, self.model_name)
        for _, path in intact:
            if path in keep or path.name == latest:
                continue
            try:
                remove_checkpoint_dir(path)
            except FileNotFoundError:
                continue
            self._verified.pop(path, None)
            self.log(f"rotation: deleted {path.name}")

    # --- find and load -----------------------------------------------------------------------------
    def newest_valid(self) -> Path | None:
        """The highest-step checkpoint that passes the full check; each skipped one is logged."""
        for _, path in checkpoint_dirs(self.dir):
            problem = self._check(path)
            if problem is None:
                return path
            self.log(f"skipping {path.name}: {problem}")
        return None

    def _check(self, path: Path) -> str | None:
        try:
            mtime = (path / MANIFEST).stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime is not None and self._verified.get(path) == mtime:
            return None
        problem = verify(path)
        if problem is None and mtime is not None:
            self._verified[path] = mtime
        return problem

    def resolve(self, ref: str) -> Path:
        """A checkpoint folder from the model name (newest valid), `latest`, a folder name like
        checkpoint_000762, a display name or a path inside checkpoints/<model>/."""
        if ref == self.model_name:
            found = self.newest_valid()
            if found is None:
                raise UserError(f"no valid checkpoint of {self.model_name!r} in {self.dir}")
            return found
        if ref == "latest":
            name = read_latest(self.layout, self.model_name)
            if name is None:
                raise UserError(f"{self.model_name!r} has no latest checkpoint")
            return self.dir / name
        if CHECKPOINT_RE.match(ref) and (self.dir / ref).is_dir():
            return self.dir / ref
        path = find_checkpoint(self.layout, ref)  # a display name or a folder inside checkpoints/
        if path.parent != self.dir.resolve():
            raise UserError(f"{ref!r} is a checkpoint of {path.parent.name!r}, not {self.model_name!r}")
        return path

    def load(self, path: Path, backend: Backend, optimizer: bool = True) -> dict[str, Any]:
        """Restore weights (and optimizer state) into `backend` after the full check; returns
        trainer_state. Raises UserError with one line for a torn, foreign or mismatched checkpoint."""
        path = Path(path)
        problem = self._check(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is unusable: {problem}")
        state = read_trainer_state(path)
        if state is None or state.get("format") != TRAINER_STATE_FORMAT:
            raise UserError(f"{path} is not a packtrain checkpoint (trainer_state.json missing or foreign)")
        check_shape(path, backend.model_config())
        load_weights(path, backend)
        if optimizer:
            if not (path / OPTIMIZER_FILE).is_file() or "optimizer" not in state:
                raise UserError(f"checkpoint {path.name} holds no optimizer state to resume from")
            load_optimizer(path / OPTIMIZER_FILE, state["optimizer"], backend)
        return state


# --- model weights --------------------------------------------------------------------------------


def check_shape(path: Path, current: dict[str, Any]) -> None:
    try:
        saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"checkpoint {path.name} has no readable config.json") from None
    for key in SHAPE_KEYS:
        if key in saved and key in current and saved[key] != current[key]:
            raise UserError(f"checkpoint {path.name} is for a different model: {key} is {saved[key]} there, "
                            f"{current[key]} here")


def load_folder(path: Path, backend: Backend, train: TrainConfig) -> None:
    """Build `backend`'s model from any HF Llama folder with one model.safetensors (a checkpoint, an
    export, a hub snapshot) and load its weights: how a model is used outside training."""
    backend.build(read_config_json(path), train)
    load_weights(path, backend)


def load_weights(path: Path, backend: Backend) -> None:
    expected = backend.weight_shapes()
    tensors = backend.load_tensors(path / MODEL_FILE)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"checkpoint {path.name} does not fit this model: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected tensors (e.g. {first})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"checkpoint {path.name} does not fit this model: {name} is "
                            f"{tuple(tensor.shape)} there, {expected[name]} here")
    backend.load_weights(tensors)


def copy_tokenizer(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UserError(f"tokenizer folder {src} does not exist")
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name not in RESERVED and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(p, dst / p.name)


# --- optimizer state ------------------------------------------------------------------------------


def load_optimizer(file: Path, saved: dict[str, Any], backend: Backend) -> None:
    """Optimizer state by parameter name, whichever backend saved it: the groups must hold the
    same names (in any order) and every tensor must belong to a parameter of this model."""
    groups = saved.get("param_groups")
    current = backend.optimizer_groups()
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups) \
            or [set(g["params"]) for g in groups] != [set(names) for names in current]:
        raise UserError(f"optimizer state in {file.parent.name} was saved for different parameter groups; "
                        "resume with --reset-optimizer to continue the weights with fresh optimizer state")
    flat = {name for names in current for name in names}
    by_param: dict[str, dict[str, Any]] = {}
    for key, tensor in backend.load_tensors(file).items():
        param, _, entry = key.partition("/")
        by_param.setdefault(param, {})[entry] = tensor
    stray = sorted(set(by_param) - flat)
    if stray:
        raise UserError(f"optimizer state in {file.parent.name} holds tensors for unknown parameters "
                        f"(e.g. {stray[0]})")
    backend.load_optimizer_state(by_param, saved)
