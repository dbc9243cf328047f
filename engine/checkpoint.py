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
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from engine.atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir, remove_stale_tmp
from engine.backends.base import Backend
from engine.catalog import (
    MODEL_FILE, checkpoint_dirs, display_name, find_checkpoint, read_latest, read_trainer_state, remove_checkpoint_dir,
    usable_problem, write_latest,
)
from engine.config import TrainConfig
from engine.control import engine_lock_held, live_engine
from engine.errors import UserError
from engine.manifest import (
    MANIFEST, Verdicts, check_sizes, hash_file, read_manifest, remember, verify,
)
from engine.model_config import read_config_json
from engine.paths import CHECKPOINT_RE, Layout, checkpoint_dirname
from engine.pretrained import BASE_FILE
from engine.state import TRAINER_STATE, TRAINER_STATE_FORMAT, OptimizerState, TrainerState, load_trainer_state

OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
SUPERSEDED_PREFIX = f"{TMP_PREFIX}superseded-"
# Files of ours a tokenizer folder must never overwrite, and weight files that are not tokenizer files.
RESERVED = {MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, GENERATION_FILE, TRAINER_STATE, MANIFEST, BASE_FILE}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")
# LlamaConfig fields that decide whether weights fit a model.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
HF_FILES_EXCLUDED = {OPTIMIZER_FILE, TRAINER_STATE, MANIFEST}
# Written first into an export's temporary folder and removed just before the rename: it marks the
# folder as ours, so cleaning up after a killed export never touches a folder of the user's.
EXPORT_MARKER = ".packtrain-export"
GLOB_CHARS = frozenset("*?[]")


@dataclass
class SavedCheckpoint:
    path: Path
    display_name: str
    bytes: int
    seconds: float


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: RANK is set by torchrun before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checked_state(path: Path) -> TrainerState:
    """The state of a checkpoint after the full check, before anything is loaded or written.
    Raises UserError with one line for a torn, foreign or corrupt checkpoint or a bad state."""
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is unusable: {problem}")
    return load_trainer_state(path)


def copy_hf_files(checkpoint: Path, out_dir: Path) -> None:
    for name in read_manifest(checkpoint):
        if name not in HF_FILES_EXCLUDED:
            shutil.copyfile(checkpoint / name, out_dir / name)


def export_hf(checkpoint: Path, out_dir: Path, fill: Callable[[Path, Path], None] = copy_hf_files) -> Path:
    """A plain HF folder (weights, config, tokenizer; no optimizer or trainer state), committed with
    one rename so a half-written export never looks complete. `fill(checkpoint, folder)` writes the
    files: a copy, or an adapter's peft folder or merged model (engine.backends.torch_finetune)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_export_name(out_dir)
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
        for stale in stale_exports(out_dir):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / EXPORT_MARKER).touch()
        fill(checkpoint, tmp)
        (tmp / EXPORT_MARKER).unlink()
        for written in tmp.iterdir():
            fsync_file(written)
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


def check_export_name(out_dir: Path) -> None:
    """An export folder's name is typed by a person: glob characters there are a quoting mistake
    (`'out/*'`), and control characters never name a folder anyone meant to create."""
    name = out_dir.name
    if not name or name in {".", ".."}:
        raise UserError(f"cannot export to {out_dir}: give the name of a new folder")
    odd = sorted({c for c in name if c in GLOB_CHARS or not c.isprintable()})
    if odd:
        raise UserError(f"refusing to export to {str(out_dir)!r}: its name holds {''.join(odd)!r}; "
                        "choose a plain folder name")


def stale_exports(out_dir: Path) -> list[Path]:
    """Temporaries a killed export to `out_dir` left beside it: exactly our name pattern (the escaped
    folder name plus an 8-hex id), a real folder, and either our marker inside or nothing at all (killed
    before the marker was written). A user's own `.tmp-<name>-backup/` matches none of that."""
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{out_dir.name}-") + "[0-9a-f]{8}")
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
            and ((p / EXPORT_MARKER).is_file() or not any(p.iterdir()))]


class NonFiniteWeights(UserError):
    """A save refused because a parameter is NaN or infinite: a checkpoint is always one to go back to."""


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
        if not backend.weights_finite():
            raise NonFiniteWeights(f"not saving step {step:,}: the weights hold NaN or inf values")
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
            for file, text in backend.extra_files().items():
                (tmp / file).write_text(text, encoding="utf-8")
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
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None and not target.exists():
                os.rename(aside, target)
            if isinstance(e, SafetensorError):  # a full disk while writing tensors: not an OSError
                raise UserError(f"cannot save {name} in {self.dir}: {one_line(e)}", exit_code=1) from None
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        write_latest(self.layout, self.model_name, name)
        verdicts = Verdicts(self.layout.verdicts(self.model_name))  # every file was just hashed: a listing needn't
        remember(target, check_sizes(target, manifest), None, verdicts)
        self._rotate(verdicts)
        verdicts.save()
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

    def _rotate(self, verdicts: Verdicts) -> None:
        """Keep the last N usable checkpoints (the listing's rule, from cached verdicts), the best by
        eval loss and whatever `latest` names; torn or corrupt folders are left for the user to
        inspect (they list as invalid) and never count towards N."""
        intact = [(step, path) for step, path in checkpoint_dirs(self.dir) if usable_problem(path, verdicts) is None]
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
            self.log(f"rotation: deleted {path.name}")

    # --- find and load -----------------------------------------------------------------------------
    def newest_valid(self, at_most: int | None = None) -> Path | None:
        """The highest-step checkpoint that passes the full check (files and state shape), the rule
        the catalog lists by; each skipped one is logged. `at_most`: no later than this step (a
        rollback goes back, never to a save of the timeline it abandoned)."""
        for step, path in checkpoint_dirs(self.dir):
            if at_most is not None and step > at_most:
                continue
            problem = usable_problem(path)
            if problem is None:
                return path
            self.log(f"skipping {path.name}: {problem}")
        return None

    def open(self, path: Path) -> TrainerState:
        """The state of a checkpoint after the full check, before anything is loaded or written.
        Raises UserError with one line for a torn, foreign or corrupt checkpoint or a bad state."""
        return checked_state(path)

    def resolve(self, ref: str) -> Path:
        """A checkpoint folder from the model name (newest valid), `latest`, a folder name like
        checkpoint_000762, a display name or a path inside checkpoints/<model>/."""
        if ref == self.model_name:
            found = self.newest_valid()
            if found is None:
                newest = next((path for _, path in checkpoint_dirs(self.dir)), None)
                why = f" (newest, {newest.name}: {usable_problem(newest)})" if newest is not None else ""
                raise UserError(f"no valid checkpoint of {self.model_name!r} in {self.dir}{why}")
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

    def load(self, path: Path, backend: Backend, optimizer: bool = True) -> TrainerState:
        """Restore weights (and optimizer state) into `backend` after the full check; returns the
        trainer state. Raises UserError with one line for a torn, foreign or mismatched checkpoint."""
        path = Path(path)
        state = self.open(path)
        check_shape(path, backend.model_config())
        try:
            load_weights(path, backend)
            if optimizer:
                if not (path / OPTIMIZER_FILE).is_file() or state.optimizer is None:
                    raise UserError(f"checkpoint {path.name} holds no optimizer state to resume from")
                load_optimizer(path / OPTIMIZER_FILE, state.optimizer, backend)
        except SafetensorError as e:  # intact by hash, yet not a tensor file this library reads
            raise UserError(f"checkpoint {path.name} has unreadable tensors: {one_line(e)}") from None
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
    """Regular files only: a symlink in the cache's tokenizer folder could point at any readable
    file, which would then travel in every checkpoint, its MANIFEST and every export."""
    if src.is_symlink() or not src.is_dir():
        raise UserError(f"tokenizer folder {src} does not exist or is a symlink")
    for p in sorted(src.iterdir()):
        if p.is_symlink() or not p.is_file():
            continue
        if not p.name.startswith(".") and p.name not in RESERVED and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(p, dst / p.name)


# --- optimizer state ------------------------------------------------------------------------------


def load_optimizer(file: Path, saved: OptimizerState, backend: Backend) -> None:
    """Optimizer state by parameter name, whichever backend saved it, checked before it is loaded: a
    tensor of the wrong shape would otherwise fail at the first step, after the run has started. The
    groups must hold the same names (in any order); the backend checks the hyperparameters."""
    where = f"optimizer state in {file.parent.name}"
    current = backend.optimizer_groups()
    if [set(g.get("params") or ()) for g in saved.param_groups] != [set(names) for names in current]:
        raise UserError(f"{where} was saved for different parameter groups; resume with --reset-optimizer "
                        "to continue the weights with fresh optimizer state")
    shapes = backend.weight_shapes()
    by_param: dict[str, dict[str, Any]] = {}
    for key, tensor in backend.load_tensors(file).items():
        param, _, entry = key.partition("/")
        by_param.setdefault(param, {})[entry] = tensor
    stray = sorted((set(by_param) | set(saved.scalars)) - {name for names in current for name in names})
    if stray:
        raise UserError(f"{where} holds state for unknown parameters (e.g. {stray[0]})")
    for name, entry in by_param.items():
        for key, tensor in entry.items():
            if len(tensor.shape) and tuple(tensor.shape) != shapes[name]:
                raise UserError(f"{where}: {name}/{key} is {tuple(tensor.shape)}, the parameter {shapes[name]}")
        clash = sorted(set(entry) & set(saved.scalars.get(name, {})))
        if clash:
            raise UserError(f"{where}: {name}/{clash[0]} is both a tensor and a scalar")
    backend.load_optimizer_state(by_param, saved, where)
