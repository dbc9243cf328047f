"""The lean Llama against transformers' LlamaForCausalLM: same tensors, same maths, same gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM as HFLlama

from engine.backends import torch_fast_llama as fast_llama
from engine.backends.torch_model import (
    build_model, count_params, generating_view, lm_loss, masked_nll, model_impl, param_groups,
)
from engine.backends.torch_state import unwrap
from engine.errors import UserError
from engine.token_flags import START, TRAIN, loss_mask, position_ids

CONFIGS = {
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0,
                       rms_norm_eps=1e-6),
    "gqa-head-dim-bias": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=10, attention_bias=True,
                              mlp_bias=True, tie_word_embeddings=True, pad_token_id=0),
    "mqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}),
}
VOCAB, SEQ = 101, 24
REPO = Path(__file__).resolve().parents[1]


def config(**overrides: Any) -> dict[str, Any]:
    """config.json fields, as run assembly hands them to the backend."""
    return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, bos_token_id=1, eos_token_id=2) | overrides


def pair(cfg: dict[str, Any], seed: int = 0) -> tuple[fast_llama.LlamaForCausalLM, HFLlama]:
    """A fast model with lively weights (not the near-zero init) and an HF model holding the same."""
    fast = build_model(cfg, seed, impl="fast")
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.05))
    hf = build_model(cfg, seed + 1, impl="hf")
    assert not hf.load_state_dict(fast.state_dict(), strict=True).missing_keys
    return fast, hf


def rows(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_loss_and_gradients_match_transformers(name: str) -> None:
    fast, hf = pair(config(**CONFIGS[name]))
    x = rows()
    with torch.no_grad():
        torch.testing.assert_close(fast(x[:, :-1]), hf(input_ids=x[:, :-1]).logits, rtol=1e-5, atol=1e-5)
    losses = []
    for model in (fast, hf):
        loss = lm_loss(model, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    hf_params = dict(hf.named_parameters())
    assert [n for n, _ in fast.named_parameters()] == list(hf_params)
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trips_exactly_under_hf_names(name: str) -> None:
    cfg = config(**CONFIGS[name])
    hf = build_model(cfg, 5, impl="hf")
    fast = build_model(cfg, 6, impl="fast")
    fast.load_state_dict(hf.state_dict(), strict=True)
    mine, theirs = fast.state_dict(), hf.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert (fast.lm_head.weight is fast.model.embed_tokens.weight) is cfg["tie_word_embeddings"]
    assert count_params(fast) == count_params(hf)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = rows()
    grads = []
    for enabled in (False, True):
        fast, _ = pair(config(**CONFIGS["gqa-untied"]))
        if enabled:
            fast.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert fast.is_activation_checkpointing is enabled
        lm_loss(fast, x).backward()
        grads.append([p.grad for p in fast.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_chunked_loss_equals_one_chunk_and_eval_computes_no_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, _ = pair(config(**CONFIGS["mha-tied"]))
    x = rows(4)
    whole = lm_loss(fast, x)
    whole.backward()
    want = [p.grad.clone() for p in fast.parameters()]
    fast.zero_grad(set_to_none=True)
    monkeypatch.setattr(fast_llama, "LOSS_CHUNK_ELEMENTS", 7 * VOCAB)  # 7-row chunks, a ragged last one
    chunked = lm_loss(fast, x)
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    for a, b in zip(want, (p.grad for p in fast.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert lm_loss(fast, x).item() == pytest.approx(whole.item(), rel=1e-6)


def test_bf16_autocast_step_is_close_to_fp32() -> None:
    fast, hf = pair(config(**CONFIGS["gqa-untied"]))
    x = rows()
    fp32 = lm_loss(fast, x).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss(fast, x)
        theirs = lm_loss(hf, x)
    ours.backward()
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(fp32, rel=2e-2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-2)
    assert all(p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_init_depends_only_on_the_seed_and_is_the_llama_init() -> None:
    cfg = config(**CONFIGS["gqa-head-dim-bias"], hidden_size=96, intermediate_size=256)
    a, b, c = build_model(cfg, 3), build_model(cfg, 3), build_model(cfg, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    up = a.model.layers[0].mlp.up_proj
    assert up.weight.std().item() == pytest.approx(0.02, rel=0.05) and torch.all(up.bias == 0)
    assert torch.all(a.model.norm.weight == 1) and torch.all(a.model.embed_tokens.weight[0] == 0)  # pad row


def test_weight_decay_groups_are_the_same_for_both_implementations() -> None:
    fast, hf = pair(config(**CONFIGS["gqa-untied"]))
    names = []
    for model in (fast, hf):
        by_id = {id(p): n for n, p in model.named_parameters()}
        names.append([sorted(by_id[id(p)] for p in group["params"]) for group in param_groups(model, 0.1)])
    assert names[0] == names[1]


def test_implementation_choice_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()
    monkeypatch.delenv("PACKTRAIN_MODEL_IMPL", raising=False)
    assert model_impl() == "fast" and isinstance(build_model(cfg, 0), fast_llama.LlamaForCausalLM)
    monkeypatch.setenv("PACKTRAIN_MODEL_IMPL", "hf")
    assert isinstance(build_model(cfg, 0), HFLlama)
    monkeypatch.setenv("PACKTRAIN_MODEL_IMPL", "jax")
    with pytest.raises(UserError, match="PACKTRAIN_MODEL_IMPL must be one of fast, hf"):
        build_model(cfg, 0)
    longrope = config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 6,
                                       "long_factor": [1.0] * 6, "original_max_position_embeddings": 16})
    with pytest.raises(UserError, match="rope_type 'longrope' is not supported"):
        build_model(longrope, 0, impl="fast")


def test_wrapped_model_still_takes_the_fused_loss() -> None:
    fast, _ = pair(config())
    wrapper = torch.nn.Module()
    wrapper.module = fast
    wrapper.forward = fast.forward  # what DDP does, seen from lm_loss
    assert unwrap(wrapper) is fast
    assert lm_loss(wrapper, rows()).item() == pytest.approx(lm_loss(fast, rows()).item())


def test_training_and_saving_with_the_fast_model_never_import_transformers_or_dynamo(tmp_path: Path) -> None:
    """Resume spent most of its start importing transformers, then torch._dynamo (which every
    torch.optim optimizer imports): the default path must need neither."""
    script = f"""
import sys
import numpy as np
from engine.backends.torch_backend import TorchBackend
from engine.config import RunConfig
from engine.paths import Layout

backend = TorchBackend(RunConfig.from_dict({{"train": {{"precision": "fp32", "device": "cpu"}}}}), Layout.resolve({str(tmp_path)!r}))
backend.build({config()!r}, RunConfig().train)
backend.train_step(np.ones((2, 9), dtype=np.int64), 1e-3, micro_batch=2, grad_accum=1, grad_clip=1.0, want_norm=True)
facts = (backend.model_config(), backend.generation_config(), backend.versions(), backend.facts(Layout.resolve({str(tmp_path)!r})))
backend.optimizer_state()
backend.optimizer.load_state_dict(backend.optimizer.state_dict())
assert "transformers" not in sys.modules, sorted(m for m in sys.modules if m.startswith("transformers"))[:5]
assert "torch._dynamo" not in sys.modules
print(facts[0]["architectures"], facts[2]["transformers"])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['LlamaForCausalLM']", version("transformers")]


def test_packed_examples_loss_and_gradients_match_transformers() -> None:
    """Instruction caches: positions restart per packed example (each attends only to itself) and
    only flagged targets count, summed (engine.token_flags)."""
    fast, hf = pair(config(**CONFIGS["gqa-untied"]))
    x = rows()
    flags = np.zeros(x.shape, dtype=np.uint8)
    flags[:, [0, 9, 17]] |= START
    flags[:, 4:9] |= TRAIN
    flags[:, 12:] |= TRAIN
    positions, mask = torch.from_numpy(position_ids(flags)), torch.from_numpy(loss_mask(flags))
    losses = []
    for model in (fast, hf):
        loss = masked_nll(model, x, positions, mask)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    hf_params = dict(hf.named_parameters())
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)


def test_training_samples_generate_from_the_fast_models_own_tensors() -> None:
    """Samples during training go through transformers' generate, on a view sharing the fast model's storage."""
    fast, _ = pair(config(**CONFIGS["mha-tied"]))
    view = generating_view(fast)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(view.state_dict().values(), fast.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(view(input_ids=rows()).logits, fast(rows()), rtol=1e-5, atol=1e-5)
        fast.lm_head.weight.add_(1.0)  # a training step moves the weights: the view sees them
        torch.testing.assert_close(view(input_ids=rows()).logits, fast(rows()), rtol=1e-5, atol=1e-5)
