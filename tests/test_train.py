"""Loop pieces: optimizer groups, loss, precision choice, RNG round trip; and live cache growth."""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends.torch_backend import pick_precision, prepare_model, rng_state, set_rng_state
from engine.backends.torch_model import build_model, count_params, lm_loss, param_groups
from engine.config import ModelConfig, RunConfig, TrainConfig
from engine.errors import UserError
from engine.model_config import llama_config
from engine.paths import Layout
from engine.presets import PRESETS
from engine.state import RngState, decode
from tests.train_support import BACKENDS, build_tiny_cache, data_flags, read_log, start_engine, train_flags, wait_event, write_corpus


TINY = llama_config(ModelConfig(preset="tiny"), 300, 32, {})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(TINY, seed=3)


def test_model_matches_the_preset_and_the_hf_one_uses_sdpa(model: torch.nn.Module) -> None:
    assert count_params(model) == PRESETS["tiny"].n_params(300)
    assert build_model(TINY, seed=3, impl="hf").config._attn_implementation == "sdpa"
    again = build_model(TINY, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_no_weight_decay_on_norms_biases_or_embeddings(model: torch.nn.Module) -> None:
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed and all("proj" in n for n in decayed)
    assert not any("norm" in n or "embed" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_is_next_token_cross_entropy_over_packed_rows(model: torch.nn.Module) -> None:
    rows = torch.randint(0, 300, (3, 33))
    reference = build_model(TINY, 0, impl="hf")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = lm_loss(model, rows)
        hf = reference(input_ids=rows, labels=rows).loss  # HF shifts inside: same targets, same mean
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)


def test_fp16_is_refused_without_cuda_and_an_explicit_choice_is_kept(tmp_path: Path) -> None:
    """What `auto` picks is engine.backends.torch_precision's, tested in test_precision.py."""
    layout, cfg = Layout.resolve(tmp_path), RunConfig()
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16", "cpu", cfg, layout)
    assert pick_precision("fp32", "cpu", cfg, layout) == "fp32"


def test_rng_state_is_json_and_restores_exactly() -> None:
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    state = decode(RngState, json.loads(json.dumps(asdict(rng_state()))), "rng")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(state)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_live_growth_is_picked_up_at_a_step_boundary(tmp_path: Path, backend: str) -> None:
    corpus = write_corpus(tmp_path)
    build_tiny_cache(tmp_path, corpus, "--max-chunks", "4")
    flags = [*data_flags(corpus), *train_flags(growth_check_interval=2, save_interval=1000, micro_batch=2,
                                               grad_accum=1, backend=backend)]
    proc = start_engine(tmp_path, "train", "--name", "live", *flags)
    try:
        plan = wait_event(proc, lambda e: e["event"] == "plan")
        wait_event(proc, lambda e: e["event"] == "step" and e["step"] >= 2)
        build_tiny_cache(tmp_path, corpus, "--max-chunks", "7")
        grown = wait_event(proc, lambda e: e["event"] == "cache_expanded")
        new_plan = wait_event(proc, lambda e: e["event"] == "plan")
        assert grown["step"] % 2 == 0 and grown["n_after"] > grown["n_before"]
        assert new_plan["previous_total_steps"] == plan["total_steps"] < new_plan["total_steps"]
        after = wait_event(proc, lambda e: e["event"] == "step")
        assert after["total_steps"] == new_plan["total_steps"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    messages = [e["message"] for e in read_log(tmp_path, "live", 1) if e["event"] == "log"]
    assert any(m.startswith("Dataset expanded: ") for m in messages)
    assert any(m.startswith("Using dynamic total steps: ") for m in messages)


def test_run_log_writes_the_header_first_and_survives_a_closed_pipe(tmp_path: Path) -> None:
    import io

    from engine import protocol as P
    from engine.run_log import RunLog

    out = io.StringIO()
    log = RunLog(events=False, stream=out)
    log.info("Dataset expanded: 1 → 2 sequences")  # before the log exists: shown now, written later
    log.attach(tmp_path / "m_run_1.jsonl", P.RunStarted(model="m", run=1))
    log.emit(P.Step(step=770, total_steps=26235, loss=5.583, lr=1e-3, grad_norm=1.0, tokens_per_sec=106212,
                    eta_s=4 * 3600 + 23 * 60, progress_pct=2.935, rss_gb=1.0))
    out.close()  # the reader went away: training must go on, the file still gets every event
    log.emit(P.Finished(step=770, reason="stopped"))
    log.close()
    kinds = [json.loads(line)["event"] for line in (tmp_path / "m_run_1.jsonl").read_text().splitlines()]
    assert kinds == ["run", "log", "step", "finished"]


def test_human_progress_line_format() -> None:
    from engine import protocol as P
    from engine.run_log import human

    line = human(P.Step(step=770, total_steps=26235, loss=5.583, lr=1e-3, grad_norm=1.0, tokens_per_sec=106212,
                        eta_s=4 * 3600 + 23 * 60, progress_pct=2.935, rss_gb=1.0))
    assert line == "Step 770/26,235 (2.9%) | Loss: 5.583 | 106,212 tok/s | ETA: 04:23h"


@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_gradient_checkpointing_recomputes_the_same_gradients(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--grad-checkpointing trades compute for memory; it must not change what the step computes."""
    monkeypatch.setenv("PACKTRAIN_MODEL_IMPL", impl)
    rows = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    grads = []
    for enabled in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the deprecated transformers API warns
            m = prepare_model(TINY, TrainConfig(grad_checkpointing=enabled), torch.device("cpu"))
            assert m.is_activation_checkpointing is enabled
        m.train()
        lm_loss(m, rows).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
