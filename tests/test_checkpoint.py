"""Checkpointer: exact round trips, HF compatibility, crash safety, rotation and resolution."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.backends.torch_backend import TorchBackend
from engine.backends.torch_model import build_model
from engine.backends.torch_state import unwrap
from engine.catalog import MANIFEST, TRAINER_STATE
from engine.checkpoint import MODEL_FILE, OPTIMIZER_FILE, SUPERSEDED_PREFIX, Checkpointer, export_hf, verify
from engine.config import RunConfig, TrainConfig
from engine.errors import UserError
from engine.manifest import hash_file
from engine.paths import Layout
from engine.presets import PRESETS
from engine.schedule import Schedule

VOCAB, SEQ = 64, 16


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(PRESETS["tiny"].llama_kwargs(vocab_size=VOCAB, seq_len=SEQ) | overrides)))


def adamw(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    """Two groups, like the trainer: no weight decay on norms."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def of(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TorchBackend:
    """The torch backend around a model (and optimizer) made here, as the trainer holds them."""
    backend = TorchBackend(RunConfig(train=TrainConfig(device="cpu", precision="fp32")))
    backend.adopt(model, optimizer)
    return backend


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    x = batch(seed)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def trained(steps: int = 2, **overrides) -> tuple[LlamaForCausalLM, torch.optim.AdamW]:
    model = tiny_model(**overrides)
    opt = adamw(model)
    for s in range(steps):
        train_step(model, opt, s)
    return model, opt


@functools.cache
def trained_once() -> tuple[LlamaForCausalLM, torch.optim.AdamW]:
    """A shared trained pair for tests that only save it; never step it."""
    return trained()


def trainer_state(step: int, run: int = 1, eval_loss: float | None = None) -> dict:
    """What a Trainer hands the Checkpointer: every field but those the Checkpointer fills in."""
    schedule = Schedule(kind="cosine", peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=100)
    return {"run": run, "loss": 4.0 - step / 10, "eval_loss": eval_loss, "best_eval_loss": None, "tokens_seen": step * 32,
            "saved_at": 1_700_000_000.0 + step, "elapsed_s": 1.5, "epoch": 0, "cursor": step * 2, "growth_events": [],
            "data": {"seed": 1, "window": 8, "train_chunks": [[0, 3]], "eval_chunks": [3]},
            "plan": {"schedule": schedule.to_dict(), "global_batch": 2, "n_sequences": 1000}, "total_steps": 100,
            "scaler": None, "rng": {"torch": [1, 2, 3], "cuda": [], "numpy": ["MT19937", [5] * 624, 624, 0, 0.0],
                                    "random": [3, [7] * 625, None]},
            "cache": {"dataset_name": "stdlib", "path": "/nowhere", "total_sequences": 1234, "sequence_length": SEQ,
                      "generation": 0, "manifest_hash": "m", "tokenizer_sha256": "t", "consumed_manifest_hash": "m",
                      "dtype": "uint16", "vocab_size": VOCAB},
            "config_hash": "c", "world_size": 1, "global_batch": 2, "precision": "fp32", "versions": {"torch": "x"}}


def save_steps(ck: Checkpointer, steps, eval_losses=None, **kw) -> None:
    model, opt = trained_once()
    for i, step in enumerate(steps):
        loss = eval_losses[i] if eval_losses else None
        ck.save(step=step, backend=of(model, opt), trainer_state=trainer_state(step), eval_loss=loss, **kw)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.resolve(tmp_path).ensure()


@pytest.fixture
def logs() -> list[str]:
    return []


@pytest.fixture
def ck(layout: Layout, logs: list[str]) -> Checkpointer:
    return Checkpointer(layout, "tiny_test", keep_last=3, log=logs.append)


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def foo(): return bar"] * 20, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"]))
    out = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(out)
    (out / "model.safetensors").write_bytes(b"not a tokenizer file")  # a hub snapshot may hold weights too
    return out


# --- round trips -----------------------------------------------------------------------------------


def test_round_trip_restores_weights_and_optimizer_exactly(ck: Checkpointer) -> None:
    model, opt = trained(steps=2)
    saved = ck.save(step=2, backend=of(model, opt), trainer_state=trainer_state(2))
    assert saved.path.name == "checkpoint_000002" and saved.display_name == "tiny_test_checkpoint_2_run_1"
    assert saved.bytes > 0 and saved.seconds >= 0

    model2 = tiny_model(seed=99)
    opt2 = adamw(model2, lr=5.0)
    state = ck.load(saved.path, of(model2, opt2))
    assert (state.step, state.cursor, state.rng.torch, state.display_name) == (2, 4, [1, 2, 3], "tiny_test_checkpoint_2_run_1")
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert model2.lm_head.weight is model2.model.embed_tokens.weight or \
        model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]  # lr, betas tuple, weight decay per group
    for index, entry in sd1["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, sd2["state"][index][key]), (index, key)

    losses = [train_step(m, o, seed=7) for m, o in ((model, opt), (model2, opt2))]
    assert losses[0] == losses[1]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)



def test_fast_model_checkpoints_are_transformers_checkpoints_both_ways(ck: Checkpointer) -> None:
    """The default fast model saves what transformers loads (same logits), and a checkpoint of
    transformers' class, optimizer state included, loads into the fast model exactly."""
    fields = PRESETS["tiny"].llama_kwargs(vocab_size=VOCAB, seq_len=SEQ) | {"bos_token_id": 1, "eos_token_id": 2}
    fast = build_model(fields, 3)
    saved = ck.save(step=1, backend=of(fast, adamw(fast)), trainer_state=trainer_state(1))
    config = json.loads((saved.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 2
    assert json.loads((saved.path / "generation_config.json").read_text())["eos_token_id"] == 2
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(saved.path)(input_ids=batch(1)).logits,
                                   fast(batch(1)), rtol=1e-5, atol=1e-5)
    model, opt = trained(steps=2)
    saved = ck.save(step=2, backend=of(model, opt), trainer_state=trainer_state(2))
    again = build_model(fields, 9)
    opt2 = adamw(again, lr=5.0)
    ck.load(saved.path, of(again, opt2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    for index, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(v, opt2.state_dict()["state"][index][k]) for k, v in entry.items())

def test_trainer_state_is_completed_and_holds_param_groups(ck: Checkpointer) -> None:
    model, opt = trained()
    saved = ck.save(step=5, backend=of(model, opt), trainer_state={"run": 2, "loss": 1.5}, eval_loss=1.25)
    state = json.loads((saved.path / TRAINER_STATE).read_text())
    assert state["format"] == "packtrain.trainer_state/1"
    assert (state["model_name"], state["step"], state["display_name"]) == ("tiny_test", 5, "tiny_test_checkpoint_5_run_2")
    assert state["eval_loss"] == 1.25 and isinstance(state["saved_at"], float)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["betas"] == [0.9, 0.95]
    assert "model.embed_tokens.weight" in groups[0]["params"] and "model.norm.weight" in groups[1]["params"]
    with safe_open(str(saved.path / OPTIMIZER_FILE), "pt") as f:
        assert {"model.norm.weight/exp_avg", "model.norm.weight/exp_avg_sq", "model.norm.weight/step"} <= set(f.keys())


def test_no_pickle_anywhere_in_a_checkpoint(ck: Checkpointer, tokenizer_dir: Path) -> None:
    model, opt = trained()
    saved = ck.save(step=1, backend=of(model, opt), trainer_state=trainer_state(1), tokenizer_dir=tokenizer_dir)
    names = set(os.listdir(saved.path))
    assert names == {MODEL_FILE, OPTIMIZER_FILE, "config.json", "generation_config.json", TRAINER_STATE, MANIFEST,
                     "tokenizer.json", "tokenizer_config.json"}
    manifest = json.loads((saved.path / MANIFEST).read_text())
    assert set(manifest) == names - {MANIFEST}
    assert all(e["bytes"] == (saved.path / n).stat().st_size and e["hash"].startswith("xxh3_64:") for n, e in manifest.items())
    assert (saved.path / MODEL_FILE).read_bytes() != b"not a tokenizer file"


def test_symlinks_in_the_tokenizer_folder_are_never_copied(ck: Checkpointer, tokenizer_dir: Path, tmp_path: Path) -> None:
    """Any readable file a symlink points at would travel in the checkpoint, its MANIFEST and exports."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    os.symlink(secret, tokenizer_dir / "vocab.txt")
    os.symlink(tokenizer_dir / "tokenizer.json", tokenizer_dir / "merges.txt")
    model, opt = trained_once()
    saved = ck.save(step=1, backend=of(model, opt), trainer_state=trainer_state(1), tokenizer_dir=tokenizer_dir)
    names = set(os.listdir(saved.path))
    assert not {"vocab.txt", "merges.txt"} & names and "tokenizer.json" in names
    assert not {"vocab.txt", "merges.txt"} & set(json.loads((saved.path / MANIFEST).read_text()))
    assert "vocab.txt" not in os.listdir(export_hf(saved.path, tmp_path / "export"))


def test_a_symlinked_file_in_a_checkpoint_makes_it_invalid(ck: Checkpointer, tmp_path: Path) -> None:
    """Even with the right size and hash: export would copy (and resume read) a file from elsewhere."""
    save_steps(ck, [1])
    path = ck.dir / "checkpoint_000001"
    elsewhere = tmp_path / "config.json"
    shutil.move(path / "config.json", elsewhere)
    os.symlink(elsewhere, path / "config.json")
    assert verify(path) == "config.json is not a regular file"
    with pytest.raises(UserError, match="not a regular file"):
        export_hf(path, tmp_path / "export")


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_folder_loads_with_hugging_face(ck: Checkpointer, tokenizer_dir: Path, tmp_path: Path, tied: bool) -> None:
    model, opt = trained(tie_word_embeddings=tied)
    saved = ck.save(step=2, backend=of(model, opt), trainer_state=trainer_state(2), tokenizer_dir=tokenizer_dir)
    with safe_open(str(saved.path / MODEL_FILE), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied and "model.embed_tokens.weight" in f.keys()

    exported = export_hf(saved.path, tmp_path / "export")
    assert not {OPTIMIZER_FILE, TRAINER_STATE, MANIFEST} & set(os.listdir(exported))
    for folder in (saved.path, exported):
        hf = AutoModelForCausalLM.from_pretrained(folder)
        for name, value in model.state_dict().items():
            assert torch.equal(value, hf.state_dict()[name]), name
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok("def foo").input_ids and tok.eos_token == "<eos>"
    with pytest.raises(UserError, match="already exists"):
        export_hf(saved.path, exported)


def test_wrapped_models_save_under_hf_names(ck: Checkpointer) -> None:
    model, opt = trained()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like from outside
    assert unwrap(wrapper) is model
    saved = ck.save(step=1, backend=of(wrapper, opt), trainer_state=trainer_state(1))
    with safe_open(str(saved.path / MODEL_FILE), "pt") as f:
        assert all(not k.startswith("module.") for k in f.keys())


def test_save_without_optimizer_and_resume_needing_one(ck: Checkpointer) -> None:
    model, _ = trained()
    saved = ck.save(step=1, backend=of(model), optimizer=False, trainer_state=trainer_state(1))
    assert not (saved.path / OPTIMIZER_FILE).exists()
    ck.load(saved.path, of(tiny_model(seed=3)), optimizer=False)
    with pytest.raises(UserError, match="no optimizer state"):
        ck.load(saved.path, of(tiny_model(seed=3), adamw(tiny_model(seed=3))))


def test_state_that_is_not_json_is_refused_before_writing(ck: Checkpointer) -> None:
    model, opt = trained()
    with pytest.raises(TypeError):
        ck.save(step=1, backend=of(model, opt), trainer_state={"rng": torch.get_rng_state()})
    assert not ck.dir.exists() or not any(ck.dir.iterdir())


# --- refusals on load --------------------------------------------------------------------------------


def test_load_refuses_other_shapes_and_optimizers(ck: Checkpointer) -> None:
    model, opt = trained()
    saved = ck.save(step=1, backend=of(model, opt), trainer_state=trainer_state(1))
    with pytest.raises(UserError, match="different model: hidden_size is 64 there, 32 here") as e:
        ck.load(saved.path, of(tiny_model(hidden_size=32, intermediate_size=88)), optimizer=False)
    assert "\n" not in str(e.value)
    other = tiny_model()
    with pytest.raises(UserError, match="different parameter groups"):
        ck.load(saved.path, of(other, torch.optim.AdamW(other.parameters())))


def test_load_refuses_foreign_folders(ck: Checkpointer, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="MANIFEST.json is missing"):
        ck.load(foreign, of(tiny_model()), optimizer=False)
    (foreign / MANIFEST).write_text(json.dumps({"../escape": {"bytes": 1, "hash": "x"}}))
    with pytest.raises(UserError, match="foreign entry"):
        ck.load(foreign, of(tiny_model()), optimizer=False)


def rewrite_state(path: Path, change) -> None:
    """Edit a checkpoint's trainer_state.json and re-hash it, so only the state's shape is wrong."""
    state = json.loads((path / TRAINER_STATE).read_text())
    change(state)
    (path / TRAINER_STATE).write_text(json.dumps(state))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest[TRAINER_STATE] = {"bytes": (path / TRAINER_STATE).stat().st_size, "hash": hash_file(path / TRAINER_STATE)}
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["optimizer"]["param_groups"][0].update(betas=[2.0, 0.9]), "param group 0: Invalid beta parameter"),
    (lambda s: s["optimizer"]["param_groups"][1].update(eps="tiny"), "param group 1 has eps = tiny"),
    (lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.9]), "param group 0 has betas = [0.9]"),
    (lambda s: s["optimizer"].update(scalars={"model.norm.weight": {"exp_avg": 1}}), "is both a tensor and a scalar"),
    (lambda s: s["optimizer"].update(scalars={"nope": {"step": 1}}), "unknown parameters (e.g. nope)"),
])
def test_load_refuses_optimizer_state_the_first_step_would_fail_on(ck: Checkpointer, change, message: str) -> None:
    save_steps(ck, [1])
    rewrite_state(ck.dir / "checkpoint_000001", change)
    model = tiny_model()
    with pytest.raises(UserError, match=re.escape(message)):
        ck.load(ck.dir / "checkpoint_000001", of(model, adamw(model)))


def test_saved_flags_give_way_to_the_live_optimizers(ck: Checkpointer) -> None:
    """amsgrad without its max_exp_avg_sq state would fail at the first step; flags are this process's."""
    save_steps(ck, [1])
    rewrite_state(ck.dir / "checkpoint_000001", lambda s: s["optimizer"]["param_groups"][0].update(amsgrad=True))
    model = tiny_model()
    opt = adamw(model)
    ck.load(ck.dir / "checkpoint_000001", of(model, opt))
    assert opt.param_groups[0]["amsgrad"] is False
    train_step(model, opt, seed=1)


def test_newest_valid_skips_a_state_of_the_wrong_shape(ck: Checkpointer, logs: list[str]) -> None:
    save_steps(ck, [1, 2])
    rewrite_state(ck.dir / "checkpoint_000002", lambda s: s.update(cursor=-5))
    assert ck.newest_valid() == ck.dir / "checkpoint_000001"
    assert logs == ["skipping checkpoint_000002: trainer_state.json: field 'cursor' must be >= 0, got -5"]
    with pytest.raises(UserError, match=r"checkpoint_000002/trainer_state.json: field 'cursor' must be >= 0"):
        ck.load(ck.dir / "checkpoint_000002", of(tiny_model()), optimizer=False)


def test_a_full_disk_while_writing_tensors_is_one_line_and_keeps_the_last_checkpoint(
        ck: Checkpointer, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    import engine.backends.torch_backend as torch_backend

    save_steps(ck, [1])

    def full(*_, **__) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(torch_backend, "save_file", full)
    with pytest.raises(UserError, match="cannot save checkpoint_000002 in .*: Error while serializing") as e:
        save_steps(ck, [2])
    assert "\n" not in str(e.value) and e.value.exit_code == 1
    assert sorted(p.name for p in ck.dir.iterdir() if not p.name.startswith(".verified")) == ["checkpoint_000001", "latest"]
    assert verify(ck.dir / "checkpoint_000001") is None


# --- crashes ---------------------------------------------------------------------------------------------


def test_newest_valid_skips_torn_checkpoints_with_reasons(ck: Checkpointer, layout: Layout, logs: list[str]) -> None:
    save_steps(ck, [1, 2])
    good = ck.dir / "checkpoint_000002"
    no_manifest = ck.dir / "checkpoint_000003"
    truncated = ck.dir / "checkpoint_000004"
    bitrot = ck.dir / "checkpoint_000005"
    for bad in (no_manifest, truncated, bitrot):
        shutil.copytree(good, bad)
    (no_manifest / MANIFEST).unlink()
    with open(truncated / MODEL_FILE, "r+b") as f:
        f.truncate(1000)
    data = bytearray((bitrot / OPTIMIZER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (bitrot / OPTIMIZER_FILE).write_bytes(bytes(data))

    assert ck.newest_valid() == good
    assert logs == [
        "skipping checkpoint_000005: optimizer.safetensors is corrupt (hash mismatch)",
        f"skipping checkpoint_000004: model.safetensors is 1,000 bytes, the manifest says {(good / MODEL_FILE).stat().st_size:,}",
        "skipping checkpoint_000003: MANIFEST.json is missing (save did not finish)",
    ]
    assert ck.resolve("tiny_test") == good
    with pytest.raises(UserError, match=r"checkpoint_000004 is unusable: model.safetensors is 1,000 bytes"):
        ck.load(truncated, of(tiny_model()), optimizer=False)
    assert ck.load(good, of(tiny_model()), optimizer=False).step == 2


def test_kill_9_during_save_leaves_previous_checkpoint(ck: Checkpointer, layout: Layout, tmp_path: Path) -> None:
    save_steps(ck, [1])
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import numpy as np
        from safetensors.numpy import save_file
        import engine.checkpoint as c
        from engine.paths import Layout

        class Backend:  # no framework import: the child only has to die mid-save
            def weights(self): return {{"w": np.zeros(4, np.float32)}}
            def optimizer_state(self): return {{"w/exp_avg": np.zeros(4, np.float32)}}, {{"param_groups": []}}
            def save_tensors(self, tensors, path, metadata=None): save_file(tensors, str(path), metadata=metadata)
            def model_config(self): return {{}}
            def generation_config(self): return None
            def extra_files(self): return {{}}
            def weights_finite(self): return True

        real = c.atomic_write_bytes
        def die_after_manifest(path, data, **kw):
            real(path, data, **kw)
            os.kill(os.getpid(), signal.SIGKILL)  # fully written, never renamed into place
        c.atomic_write_bytes = die_after_manifest
        c.Checkpointer(Layout.resolve({str(layout.root)!r}), "tiny_test").save(
            step=3, backend=Backend(), trainer_state={{"run": 1}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in ck.dir.iterdir() if p.name.startswith(".tmp-checkpoint_000003-")]
    assert len(leftovers) == 1
    assert (ck.dir / "latest").read_text().strip() == "checkpoint_000001"

    logs: list[str] = []
    fresh = Checkpointer(layout, "tiny_test", log=logs.append)
    assert logs == [f"removed {leftovers[0]} left by an interrupted save or delete"]
    assert fresh.newest_valid() == ck.dir / "checkpoint_000001"
    assert fresh.load(fresh.resolve("tiny_test"), of(tiny_model()), optimizer=False).step == 1


def test_every_stale_temporary_in_the_model_folder_is_removed(ck: Checkpointer, layout: Layout) -> None:
    """Not only half saves: a kill -9 during any atomic write (run.json, engine.json, latest,
    config.yaml) leaves a `.tmp-*` there too, and the next engine start removes it."""
    model, opt = trained()
    ck.save(step=1, backend=of(model, opt), trainer_state=trainer_state(1))
    stale = [ck.dir / name for name in (".tmp-run.json-0badc0de", ".tmp-engine.json-0badc0de",
                                        ".tmp-config.yaml-0badc0de", ".tmp-latest-0badc0de")]
    for path in stale:
        path.write_text("torn")
    logs: list[str] = []
    Checkpointer(layout, "tiny_test", log=logs.append)
    assert not [p for p in stale if p.exists()] and len(logs) == 4
    assert sorted(p.name for p in ck.dir.iterdir()) == [".verified.json", "checkpoint_000001", "latest"]


def test_temporaries_of_another_live_engine_are_left_alone(layout: Layout) -> None:
    from engine.control import EngineInfo
    import dataclasses
    import psutil

    model_dir = layout.model_dir("tiny_test")
    model_dir.mkdir(parents=True)
    live_save = model_dir / ".tmp-checkpoint_000009-abcdef12"
    live_save.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = EngineInfo(model="tiny_test", pid=other.pid, create_time=psutil.Process(other.pid).create_time(),
                          run=1, log="", started=0.0)
        layout.engine_pidfile("tiny_test").write_text(json.dumps(dataclasses.asdict(info)))
        Checkpointer(layout, "tiny_test")
        assert live_save.exists()
    finally:
        other.kill()
        other.wait()
    Checkpointer(layout, "tiny_test")  # the engine is gone: now it is a crash leftover
    assert not live_save.exists()


def test_saving_a_step_again_replaces_it_and_an_interrupted_replace_is_undone(ck: Checkpointer, layout: Layout) -> None:
    model, opt = trained()
    ck.save(step=2, backend=of(model, opt), trainer_state=trainer_state(2, run=1))
    ck.save(step=2, backend=of(model, opt), trainer_state=trainer_state(2, run=2))
    path = ck.dir / "checkpoint_000002"
    assert json.loads((path / TRAINER_STATE).read_text())["run"] == 2
    assert [p.name for p in ck.dir.iterdir() if p.name.startswith(".tmp")] == []

    aside = ck.dir / f"{SUPERSEDED_PREFIX}checkpoint_000002-0123abcd"
    os.rename(path, aside)  # the crash window: old moved aside, new not yet in place
    logs: list[str] = []
    Checkpointer(layout, "tiny_test", log=logs.append)
    assert path.is_dir() and not aside.exists() and logs == ["restored checkpoint_000002 from an interrupted replace"]


# --- rotation and the latest pointer -------------------------------------------------------------------


def test_rotation_keeps_last_n_plus_best(layout: Layout, logs: list[str]) -> None:
    ck = Checkpointer(layout, "tiny_test", keep_last=2, log=logs.append)
    save_steps(ck, [1, 2, 3, 4, 5], eval_losses=[3.0, 1.0, 2.0, None, 2.5])
    assert sorted(p.name for p in ck.dir.iterdir() if p.name.startswith("checkpoint_")) == \
        ["checkpoint_000002", "checkpoint_000004", "checkpoint_000005"]
    assert (ck.dir / "latest").read_text() == "checkpoint_000005\n"
    assert "rotation: deleted checkpoint_000001" in logs and "rotation: deleted checkpoint_000003" in logs


def test_rotation_never_deletes_what_latest_names(layout: Layout) -> None:
    ck = Checkpointer(layout, "tiny_test", keep_last=2)
    save_steps(ck, [5, 6, 7, 3])  # a run resumed from an older checkpoint saves below the newest
    assert (ck.dir / "latest").read_text() == "checkpoint_000003\n"
    assert sorted(p.name for p in ck.dir.iterdir() if p.name.startswith("checkpoint_")) == \
        ["checkpoint_000003", "checkpoint_000006", "checkpoint_000007"]


def test_rotation_ignores_torn_folders_when_counting(layout: Layout) -> None:
    ck = Checkpointer(layout, "tiny_test", keep_last=2)
    (ck.dir / "checkpoint_000009").mkdir(parents=True)  # torn: no manifest, higher step
    save_steps(ck, [1, 2, 3])
    assert sorted(p.name for p in ck.dir.iterdir() if p.name.startswith("checkpoint_")) == \
        ["checkpoint_000002", "checkpoint_000003", "checkpoint_000009"]


def test_rotation_counts_only_checkpoints_resume_could_use(layout: Layout) -> None:
    """A flipped byte or a state of the wrong shape keeps its folder (to inspect) but not its place
    among the last N: the older usable one stays instead."""
    ck = Checkpointer(layout, "tiny_test", keep_last=2)
    save_steps(ck, [1, 2, 3])
    corrupt = ck.dir / "checkpoint_000003" / OPTIMIZER_FILE
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    save_steps(ck, [4])
    rewrite_state(ck.dir / "checkpoint_000004", lambda s: s.update(run=0))
    save_steps(ck, [5])
    assert sorted(p.name for p in ck.dir.iterdir() if p.name.startswith("checkpoint_")) == \
        ["checkpoint_000002", "checkpoint_000003", "checkpoint_000004", "checkpoint_000005"]


def test_keep_last_must_be_at_least_two(layout: Layout) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Checkpointer(layout, "tiny_test", keep_last=1)


# --- resolve ----------------------------------------------------------------------------------------------


def test_resolve_references(ck: Checkpointer, tmp_path: Path) -> None:
    save_steps(ck, [1, 2])
    two = ck.dir / "checkpoint_000002"
    assert ck.resolve("tiny_test") == two
    assert ck.resolve("latest") == two
    assert ck.resolve("tiny_test_checkpoint_1_run_1") == ck.dir / "checkpoint_000001"
    assert ck.resolve("checkpoint_000001") == ck.dir / "checkpoint_000001"
    assert ck.resolve(str(two)) == two
    for bad, message in (("tiny_test_checkpoint_1_run_7", "no checkpoint named"),
                         ("other_checkpoint_1_run_1", "no checkpoint named"),
                         ("nope", "no checkpoint 'nope'")):
        with pytest.raises(UserError, match=message):
            ck.resolve(bad)
    save_steps(Checkpointer(ck.layout, "other"), [1])
    with pytest.raises(UserError, match="is a checkpoint of 'other', not 'tiny_test'"):
        ck.resolve("other_checkpoint_1_run_1")
    empty = Checkpointer(Layout.resolve(tmp_path / "empty"), "tiny_test")
    with pytest.raises(UserError, match="no valid checkpoint"):
        empty.resolve("tiny_test")
