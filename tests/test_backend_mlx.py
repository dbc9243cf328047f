"""The mlx backend (mlx-lm's llama on this machine's CPU): it learns, it shares torch's checkpoint layout
(HF names, AdamW moments under torch's keys), and checkpoints cross between the backends both ways.

The behaviour every backend shares (exact resume after kill -9, growth, control, detach) is tested
by the parametrised tests in test_resume, test_train and test_engine_cli.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install -e '.[mlx]')")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from engine import catalog  # noqa: E402
from engine.backends.mlx_backend import MLXBackend  # noqa: E402
from engine.backends.torch_backend import TorchBackend  # noqa: E402
from engine.checkpoint import Checkpointer, export_hf, load_folder  # noqa: E402
from engine.config import RunConfig, TrainConfig  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.paths import Layout  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from test_checkpoint import trainer_state  # noqa: E402
from tests.train_support import (  # noqa: E402
    build_tiny_cache, data_flags, read_log, run_engine, step_losses, train_flags, write_corpus,
)

VOCAB, SEQ = 96, 16
TRAIN = TrainConfig(device="cpu", precision="fp32", seed=3, lr=1e-2)


def built(kind: type, tied: bool = True, train: TrainConfig = TRAIN) -> TorchBackend | MLXBackend:
    backend = kind(RunConfig(train=train))
    backend.build(PRESETS["tiny"].llama_kwargs(VOCAB, SEQ) | {"tie_word_embeddings": tied}, train)
    return backend


def rows(seed: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ + 1))


def step(backend: TorchBackend | MLXBackend, seed: int) -> float:
    result = backend.train_step(rows(seed), 1e-2, micro_batch=2, grad_accum=2, grad_clip=1.0, want_norm=True)
    return backend.to_host([result.loss])[0]


def as_numpy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() if torch.is_tensor(v) else np.array(v) for k, v in tensors.items()}


def assert_close(a: dict, b: dict, tol: float) -> None:
    a, b = as_numpy(a), as_numpy(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=tol, err_msg=key)


@pytest.mark.parametrize("tied", [True, False])
def test_mlx_llama_has_the_hf_names_shapes_and_groups_of_the_torch_model(tied: bool) -> None:
    t, m = built(TorchBackend, tied), built(MLXBackend, tied)
    assert m.weight_shapes() == t.weight_shapes()
    assert ("lm_head.weight" in m.weight_shapes()) is not tied
    assert [set(g) for g in m.optimizer_groups()] == [set(g) for g in t.optimizer_groups()]
    assert m.n_params == t.n_params == PRESETS["tiny"].n_params(VOCAB) + (0 if tied else VOCAB * 64)
    assert m.model_config()["architectures"] == ["LlamaForCausalLM"]


def test_a_checkpoint_continues_on_the_other_backend_with_its_adamw_state(tmp_path: Path) -> None:
    """The same AdamW update on both backends: after a torch checkpoint, one more step on mlx
    matches one more step on torch (weights and moments), and back again."""
    layout = Layout.resolve(tmp_path).ensure()
    ck = Checkpointer(layout, "cross", keep_last=5)
    t = built(TorchBackend)
    for s in range(3):
        step(t, s)
    saved = ck.save(step=3, backend=t, trainer_state=trainer_state(3))
    m = built(MLXBackend)
    ck.load(saved.path, m)
    assert_close(m.weights(), t.weights(), 0)  # weights carry bit for bit
    assert_close(m.optimizer_state()[0], t.optimizer_state()[0], 0)

    assert step(m, 3) == pytest.approx(step(t, 3), rel=1e-5)
    assert_close(m.weights(), t.weights(), 2e-5)
    assert_close(m.optimizer_state()[0], t.optimizer_state()[0], 2e-5)

    back = built(TorchBackend)
    ck.load(ck.save(step=4, backend=m, trainer_state=trainer_state(4)).path, back)
    assert step(back, 4) == pytest.approx(step(t, 4), rel=1e-5)
    assert_close(back.weights(), t.weights(), 2e-5)


def test_optimizer_state_that_cannot_carry_is_refused_with_the_way_out(tmp_path: Path) -> None:
    layout = Layout.resolve(tmp_path).ensure()
    ck = Checkpointer(layout, "amsgrad")
    t = built(TorchBackend)
    t.adopt(t.net, torch.optim.AdamW(t.optimizer.param_groups, amsgrad=True))  # a third moment
    step(t, 0)
    saved = ck.save(step=1, backend=t, trainer_state=trainer_state(1))
    with pytest.raises(UserError, match="--reset-optimizer") as e:
        ck.load(saved.path, built(MLXBackend))
    assert "\n" not in str(e.value)
    m = built(MLXBackend)
    ck.load(saved.path, m, optimizer=False)  # what --reset-optimizer does: the weights alone
    assert_close(m.weights(), t.weights(), 0)


def test_an_mlx_checkpoint_is_listed_and_exports_an_hf_folder_both_backends_load(tmp_path: Path) -> None:
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    layout = Layout.resolve(tmp_path / "root").ensure()
    m = built(MLXBackend, tied=False)
    for s in range(2):
        step(m, s)
    saved = Checkpointer(layout, "mx").save(step=2, backend=m, trainer_state=trainer_state(2))
    [entry] = catalog.list_checkpoints(layout)
    assert entry.valid and entry.display_name == "mx_checkpoint_2_run_1"
    exported = export_hf(saved.path, tmp_path / "export")

    x = rows(9)[:, :-1]
    m.model.update(m.params)
    ours = np.array(m.model(mx.array(x)))
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    reloaded, _ = load_model(Path(exported))
    np.testing.assert_allclose(np.array(reloaded(mx.array(x))), ours, rtol=1e-5, atol=1e-5)
    for kind in (TorchBackend, MLXBackend):  # how the engine opens a model outside training
        opened = kind(RunConfig(train=TRAIN))
        load_folder(exported, opened, TRAIN)
        assert opened.eval_loss(rows(9)) == pytest.approx(m.eval_loss(rows(9)), rel=1e-5)


@pytest.mark.slow
def test_mlx_learns_and_a_torch_run_continues_on_mlx(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    build_tiny_cache(tmp_path, corpus)
    flags = [*data_flags(corpus), *train_flags(max_steps=50, log_interval=5, save_interval=25)]
    learned = run_engine(tmp_path, "train", "--name", "mlx50", *flags, "--backend", "mlx")
    assert learned.returncode == 0, learned.stderr
    losses = step_losses(read_log(tmp_path, "mlx50", 1))
    assert sorted(losses) == list(range(5, 51, 5)) and losses[50] < losses[5] - 0.5, losses

    started = run_engine(tmp_path, "train", "--name", "pt", *flags, "--max-steps", "30", "--backend", "torch")
    assert started.returncode == 0, started.stderr
    moved = run_engine(tmp_path, "resume", "pt_checkpoint_25_run_1", "--backend", "mlx")
    assert moved.returncode == 0, moved.stderr
    assert "Continuing a torch checkpoint on mlx: the weights and AdamW state carry" in moved.stdout
    on_torch, on_mlx = step_losses(read_log(tmp_path, "pt", 1)), step_losses(read_log(tmp_path, "pt", 2))
    assert sorted(on_mlx) == [30]
    assert on_mlx[30] == pytest.approx(on_torch[30], rel=1e-4)  # steps 26-30, as the torch run logged them
    fresh = run_engine(tmp_path, "resume", "pt_checkpoint_25_run_1", "--backend", "mlx", "--reset-optimizer")
    assert fresh.returncode == 0, fresh.stderr
    assert "the weights carry, the optimizer starts fresh" in fresh.stdout
