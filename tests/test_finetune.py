"""Fine-tuning pretrained models: --init-from any causal LM, LoRA/QLoRA, adapter checkpoints, export, early stop.

The models are tiny random ones saved to tmp folders (tests/pretrained_support.py); runs train in
this process for a few steps, except the kill -9 test, which needs a process to kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.assemble import new_run, resume_run
from engine.catalog import list_checkpoints
from engine.checkpoint import export_hf
from engine.config import RunConfig, with_default_lr
from engine.errors import UserError
from engine.inference import load
from engine.paths import Layout
from engine.train import Options
from pretrained_support import save_tiny_pretrained
from engine.backends import has_mlx_lm
from train_support import read_log, run_engine, start_engine, step_losses, wait_event, weights, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)  # as the engine subprocesses run (OMP_NUM_THREADS=1): 2 shared cores
    base = tmp_path_factory.mktemp("pretrained")
    return {arch: save_tiny_pretrained(base / arch, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    write_corpus(root, n_docs=200)
    return root


def config(root: Path, name: str, model: Path | str, **fields: Any) -> RunConfig:
    train = {"precision": "fp32", "device": "cpu", "backend": "torch", "micro_batch": 4, "max_steps": 12,
             "log_interval": 1, "seed": 3, "eval_interval": 1000, "save_interval": 1000, "warmup_steps": 0}
    model_fields = {k: fields.pop(k) for k in list(fields) if k in ("method", "lora_dropout")}
    train.update(fields)
    return RunConfig.from_dict({
        "name": name, "model": {"init_from": str(model), **model_fields},
        "data": {"source": str(root / "docs.jsonl"), "dataset_name": f"docs-{Path(str(model)).name}", "seq_len": 32,
                 "docs_per_chunk": 40}, "train": train})


def train(root: Path, cfg: RunConfig) -> Any:
    trainer = new_run(cfg, Layout(root), Options(), workers=1)
    assert trainer.run() == 0
    return trainer


def first_last(root: Path, name: str) -> tuple[float, float]:
    losses = step_losses(read_log(root, name, 1))
    steps = sorted(losses)
    return np.mean([losses[s] for s in steps[:3]]), np.mean([losses[s] for s in steps[-3:]])


@pytest.fixture(scope="module")
def lora_run(root: Path, models: dict[str, Path]) -> Any:
    return train(root, config(root, "lora", models["llama"], method="lora", lr=2e-2, max_steps=20))


def test_lora_lowers_the_loss_and_trains_only_the_adapter(root: Path, models: dict[str, Path], lora_run: Any) -> None:
    first, last = first_last(root, "lora")
    assert last < first - 0.3, (first, last)
    plan = next(e for e in read_log(root, "lora", 1) if e["event"] == "plan")
    assert 0 < plan["n_trainable"] < plan["n_params"]
    saved = weights(root / "checkpoints" / "lora" / "checkpoint_000020")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert sum(v.size for v in saved.values()) == plan["n_trainable"]
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(models["llama"])).state_dict()
    live = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
            for k, v in lora_run.backend.net.state_dict().items() if "lora_" not in k}
    assert set(original) <= set(live)
    for k, v in original.items():
        assert torch.equal(v, live[k]), f"base weight {k} changed"
    record = json.loads((root / "checkpoints" / "lora" / "checkpoint_000020" / "base_model.json").read_text())
    assert record["init_from"] == str(models["llama"]) and record["weights_hash"]


def test_merged_export_equals_base_plus_adapter(root: Path, models: dict[str, Path], lora_run: Any,
                                                tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = root / "checkpoints" / "lora" / "checkpoint_000020"
    adapter = export_hf(ckpt, tmp_path / "adapter", _fill("export_adapter"))
    merged = export_hf(ckpt, tmp_path / "merged", _fill("export_merged"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(models["llama"]))
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter))(input_ids=ids).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
        trained = lora_run.backend.net.eval()(input_ids=ids).logits  # eval: no LoRA dropout
        used = load(Layout(root), "lora_checkpoint_20_run_1", device="cpu").model(input_ids=ids).logits  # generate, chat
    assert not torch.allclose(plain, with_adapter, atol=1e-3), "the adapter changed nothing"
    torch.testing.assert_close(used, with_adapter, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_adapter, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, with_adapter, atol=1e-5, rtol=1e-5)
    if has_mlx_lm():
        import mlx.core as mx
        import mlx_lm

        model, _ = mlx_lm.load(str(merged))
        mlx_logits = np.array(model(mx.array(ids.numpy())).astype(mx.float32))
        np.testing.assert_allclose(mlx_logits, folded.numpy(), atol=1e-3)


def _fill(name: str) -> Any:
    from engine.backends import torch_finetune

    return getattr(torch_finetune, name)


def test_a_changed_base_is_refused(root: Path, models: dict[str, Path], tmp_path: Path) -> None:
    base = shutil.copytree(models["llama"], tmp_path / "base")
    train(root, config(root, "moved", base, method="lora", max_steps=2))
    save_tiny_pretrained(base, "llama", seed=1)
    with pytest.raises(UserError, match="the base model changed"):
        resume_run("moved", Layout(root), Options())
    with pytest.raises(UserError, match="the base model changed"):
        export_hf(root / "checkpoints" / "moved" / "checkpoint_000002", tmp_path / "out", _fill("export_merged"))
    assert not (tmp_path / "out").exists()


def test_gpt2_lora_with_checkpointing_and_llama_full_fine_tune_train(root: Path, models: dict[str, Path]) -> None:
    train(root, config(root, "gpt2", models["gpt2"], method="lora", lr=2e-2, grad_checkpointing=True))
    first, last = first_last(root, "gpt2")
    assert last < first, (first, last)
    saved = weights(root / "checkpoints" / "gpt2" / "checkpoint_000012")
    assert {k.split(".")[-4] for k in saved} == {"c_attn", "c_proj", "c_fc"}  # ...c_attn.lora_A.default.weight

    cfg = config(root, "full", models["llama"], grad_checkpointing=True)
    assert with_default_lr(cfg, set()).train.lr == 2e-5  # the CLI's and the API's default for a full fine-tune
    trainer = train(root, cfg)
    assert trainer.backend.n_trainable == trainer.backend.n_params
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(root / "checkpoints" / "full" / "checkpoint_000012"))


def test_fine_tuning_refusals(root: Path, models: dict[str, Path]) -> None:
    layout = Layout(root)
    qlora = config(root, "q", models["llama"], method="qlora")
    qlora.data.dataset_name = "docs-q"
    with pytest.raises(UserError, match="qlora needs a CUDA GPU.*use --method lora"):
        new_run(qlora, layout, Options())
    assert not (root / "checkpoints" / "q").exists() and not list((root / "cache").rglob("docs-q"))
    long = config(root, "long", models["gpt2"])
    long.data.seq_len = 128
    with pytest.raises(UserError, match="seq_len 128 is longer than .*context of 64 tokens"):
        long.validate()
    with pytest.raises(UserError, match="adapts a pretrained model"):
        RunConfig.from_dict({"model": {"method": "lora"}}).validate()
    started = time.monotonic()
    with pytest.raises(UserError, match="unreachable .*someone/not-cached-model"):
        new_run(config(root, "hub", "someone/not-cached-model"), layout, Options())
    assert time.monotonic() - started < 10
    built = run_engine(root, "cache", "build", "--source", str(root / "docs.jsonl"), "--dataset-name", "docs-bytes",
                       "--tokenizer", "bytes", "--seq-len", "32")
    assert built.returncode == 0, built.stderr
    on_bytes = config(root, "bytes", models["llama"])
    on_bytes.data.dataset_name = "docs-bytes"
    with pytest.raises(UserError, match="was built with tokenizer 'bytes'"):
        new_run(on_bytes, layout, Options())
    if has_mlx_lm():
        with pytest.raises(UserError, match="mlx backend trains from scratch only"):
            new_run(config(root, "mlx", models["llama"], backend="mlx"), layout, Options())


def test_early_stop_keeps_and_labels_the_best_checkpoint(root: Path, models: dict[str, Path]) -> None:
    cfg = config(root, "early", models["llama"], lr=0.5, max_steps=40, eval_interval=1, eval_batches=1,
                 early_stop_patience=2, save_interval=1000, keep_last=2)
    trainer = train(root, cfg)
    events = read_log(root, "early", 1)
    finished = events[-1]
    assert finished["event"] == "finished" and finished["reason"] == "early_stopped"
    evals = [e["loss"] for e in events if e["event"] == "eval"]
    best = min(range(len(evals)), key=lambda i: evals[i])
    assert len(evals) == best + 3 and trainer.s.step < 40
    entries = {e.step: e for e in list_checkpoints(Layout(root), "early")}
    assert [s for s, e in entries.items() if e.is_best] == [best + 1]


def test_kill_and_resume_a_lora_run_is_exact(root: Path, models: dict[str, Path]) -> None:
    """The uninterrupted reference trains here (one thread, as the engines); the cut run is killed."""
    fields = {"method": "lora", "lr": 1e-2, "lora_dropout": 0.1, "max_steps": 16, "save_interval": 4, "seed": 5}
    train(root, config(root, "whole", models["llama"], **fields))
    reference = step_losses(read_log(root, "whole", 1))
    cfg = config(root, "cut", models["llama"], **fields).to_dict()
    flags = [f"--{key.replace('_', '-')}={value}" for section in ("model", "data", "train")
             for key, value in cfg[section].items() if value is not None and value != getattr(
                 RunConfig(), section).__dict__[key]]
    proc = start_engine(root, "train", "--name", "cut", *flags)
    saved = wait_event(proc, lambda e: e["event"] == "checkpoint_saved" and e["step"] >= 4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_engine(root, "resume", "cut")
    assert again.returncode == 0, again.stderr
    second = read_log(root, "cut", 2)
    assert second[0]["start_step"] >= saved["step"]
    resumed = step_losses(second)
    assert sorted(resumed) == list(range(second[0]["start_step"] + 1, 17))
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
    a, b = (weights(root / "checkpoints" / n / "checkpoint_000016") for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lora_on_instruction_data_lowers_the_response_loss(root: Path, models: dict[str, Path]) -> None:
    source = root / "pr.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"the cat sat on mat {i} and ", "response": "the dog ran far away."})
                              + "\n" for i in range(160)), encoding="utf-8")
    cfg = config(root, "instruct", models["llama"], method="lora", lr=2e-2, eval_interval=6, max_steps=12)
    cfg.data.source, cfg.data.dataset_name = str(source), "pr-llama"
    trainer = train(root, cfg)
    assert trainer.cache.record_format == "prompt_response"
    evals = [e["loss"] for e in read_log(root, "instruct", 1) if e["event"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.1, evals
