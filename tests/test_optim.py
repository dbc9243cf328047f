"""The engine's AdamW (engine.backends.torch_optim): torch's fused update, torch's state, no dynamo."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.backends.torch_optim import AdamW


def params(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(shape, requires_grad=True) for shape in ((48, 16), (16, 16), (16,), (16,))]


def groups(ps: list[torch.Tensor]) -> list[dict]:
    """The engine's split: matrices decay, vectors do not."""
    return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]


def train(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: int, seed: int) -> None:
    """`steps` updates from seeded gradients, the LR changed every step as the schedule does."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (i + 1)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_updates_equal_torch_fused_adamw_bit_for_bit() -> None:
    ours, theirs = params(0), params(0)
    opt = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    train(opt, ours, 6, seed=1)
    train(ref, theirs, 6, seed=1)
    assert_same(ours, theirs)
    for p, q in zip(ours, theirs):
        assert opt.state[p]["step"].item() == 6
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    assert not torch.equal(ours[0], params(0)[0])


def test_state_moves_both_ways_between_torch_adamw_and_ours() -> None:
    """Checkpoints written before this optimizer (torch.optim.AdamW) resume into it, and back."""
    theirs, ours = params(0), params(0)
    torch_opt = torch.optim.AdamW(groups(theirs), lr=1e-2)
    train(torch_opt, theirs, 3, seed=2)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt = AdamW(groups(ours), lr=1e-2)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as from a file: no shared step tensors
    train(opt, ours, 2, seed=4)
    train(torch_opt, theirs, 2, seed=4)
    for p, q in zip(ours, theirs):  # torch's per-tensor loop and the fused kernel round differently
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert opt.state[p]["step"].item() == torch_opt.state[q]["step"].item() == 5
    back = torch.optim.AdamW(groups(params(3)), lr=1e-2)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip((p for g in back.param_groups for p in g["params"]), ours):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[p][key], opt.state[q][key])


def test_a_step_restored_as_a_number_on_another_device_is_moved_to_the_parameter() -> None:
    ps = params(0)
    opt = AdamW(groups(ps), lr=1e-2)
    train(opt, ps, 1, seed=5)
    opt.state[ps[0]]["step"] = 1.0
    train(opt, ps, 1, seed=6)
    assert torch.equal(opt.state[ps[0]]["step"], torch.tensor(2.0))


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1e-8}, {"weight_decay": -0.1}])
def test_the_constructor_refuses_what_torch_refuses(bad: dict) -> None:
    """engine.backends.torch_state checks a checkpoint's group numbers by constructing one."""
    with pytest.raises(ValueError):
        AdamW(params(0), **bad)
    with pytest.raises(ValueError):
        torch.optim.AdamW(params(0), **bad)


def test_under_a_grad_scaler_inf_steps_are_skipped_in_the_kernel_as_torch_does() -> None:
    """fp16 on CUDA: GradScaler hands its inf flag to the step (no host sync); a step with inf
    gradients changes nothing and is not counted, exactly as with torch's fused AdamW."""
    runs = []
    for make in (lambda ps: AdamW(groups(ps), lr=1e-2),
                 lambda ps: torch.optim.AdamW(groups(ps), lr=1e-2, fused=True)):
        ps = params(0)
        opt, scaler = make(ps), torch.amp.GradScaler("cpu", init_scale=1024.0)
        gen = torch.Generator().manual_seed(7)
        for i in range(4):
            loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in ps)
            scaler.scale(loss * (float("inf") if i == 1 else 1.0)).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        runs.append((ps, opt.state[ps[0]]["step"].item(), scaler.get_scale()))
    (ours, our_steps, our_scale), (theirs, their_steps, their_scale) = runs
    assert_same(ours, theirs)
    assert our_steps == their_steps == 3 and our_scale == their_scale == 512.0
