"""Loss masks and example boundaries in the torch backend: masked targets are free, packed examples
are blind to each other, and gradient accumulation weighs every trained token alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends.torch_backend import TorchBackend
from engine.config import RunConfig
from engine.paths import Layout
from engine.presets import get_preset
from engine.token_flags import START, TRAIN, position_ids

SEQ = 16
VOCAB = 64


def _backend(tmp_path: Path, **train: object) -> TorchBackend:
    cfg = RunConfig()
    cfg.train.precision, cfg.train.device, cfg.train.seed = "fp32", "cpu", 3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    backend = TorchBackend(cfg, Layout(tmp_path))
    backend.build(get_preset("tiny").llama_kwargs(VOCAB, SEQ), cfg.train)
    return backend


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> TorchBackend:
    return _backend(tmp_path_factory.mktemp("loss"))


def _batch(seed: int = 0, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two packed examples each: [prompt 3 | response 4] then [prompt 4 | response 5], padding."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, VOCAB, size=(n, SEQ + 1), dtype=np.int64)
    flags = np.zeros_like(rows, dtype=np.uint8)
    flags[:, 0] = flags[:, 7] = START
    flags[:, 3:7] |= TRAIN
    flags[:, 11:16] |= TRAIN
    return rows, flags


def _loss_and_grads(backend: TorchBackend, rows: np.ndarray, flags: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
    from engine.backends.torch_model import masked_nll

    backend.net.zero_grad(set_to_none=True)
    positions, mask, trained = backend._flag_tensors(flags)
    loss = masked_nll(backend.net, torch.from_numpy(rows), positions, mask) / trained
    loss.backward()
    grads = {n: p.grad.clone() for n, p in backend.net.named_parameters() if p.grad is not None}
    backend.net.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_position_ids_restart_at_each_example() -> None:
    flags = np.zeros((1, 9), dtype=np.uint8)
    flags[0, 3] = flags[0, 6] = START
    assert position_ids(flags).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]


def test_masked_targets_contribute_exactly_zero(backend: TorchBackend) -> None:
    rows, flags = _batch()
    loss, grads = _loss_and_grads(backend, rows, flags)
    changed = rows.copy()
    untrained = np.zeros_like(flags, dtype=bool)
    untrained[:, 1:] = (flags[:, 1:] & TRAIN) == 0
    untrained[:, -1] = True  # the row's last token is only ever a target, and this one is masked
    changed[untrained] = (changed[untrained] + 1) % VOCAB
    changed[:, 0] = rows[:, 0]  # inputs of trained targets stay; only targets that do not train change
    changed[:, 1:3] = rows[:, 1:3]
    changed[:, 7:11] = rows[:, 7:11]
    loss2, grads2 = _loss_and_grads(backend, changed, flags)
    assert loss2 == loss
    assert grads.keys() == grads2.keys()
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert (changed != rows).any()


@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_packed_examples_do_not_see_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """Both model classes: the lean Llama that trains, and transformers' that runs generation."""
    monkeypatch.setenv("PACKTRAIN_MODEL_IMPL", impl)
    backend = _backend(tmp_path)
    rows, flags = _batch(1)
    positions, _, _ = backend._flag_tensors(flags)

    def logits(ids: np.ndarray, **kw: object) -> torch.Tensor:
        out = backend.net(input_ids=torch.from_numpy(ids), **kw)
        return out if isinstance(out, torch.Tensor) else out.logits  # the lean model returns logits alone

    with torch.no_grad():
        first = logits(rows[:, :-1], position_ids=positions)
        other = rows.copy()
        other[:, :7] = (other[:, :7] + 5) % VOCAB  # a different first example
        changed = logits(other[:, :-1], position_ids=positions)
        second_alone = logits(rows[:, 7:-1])
    assert torch.equal(first[:, 7:], changed[:, 7:])
    assert not torch.equal(first[:, :7], changed[:, :7])
    torch.testing.assert_close(first[:, 7:], second_alone, rtol=1e-5, atol=1e-5)


def test_accumulation_weighs_every_trained_token_alike(tmp_path: Path) -> None:
    """One step of 2 micro-batches with very different trained counts equals one step of the whole batch."""
    rows, flags = _batch(2, n=4)
    flags[:2, 11:16] &= ~np.uint8(TRAIN)  # micro-batch 0 trains 4 targets a row, micro-batch 1 trains 9
    whole, split = _backend(tmp_path, grad_clip=0.0), _backend(tmp_path, grad_clip=0.0)
    before = whole.eval_loss(rows, flags)
    a = whole.train_step(rows, 1e-2, micro_batch=4, grad_accum=1, grad_clip=0.0, want_norm=True, flags=flags)
    b = split.train_step(rows, 1e-2, micro_batch=2, grad_accum=2, grad_clip=0.0, want_norm=True, flags=flags)
    assert a.loss.item() == pytest.approx(before, rel=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad_norm, b.grad_norm, rtol=1e-5, atol=1e-7)
