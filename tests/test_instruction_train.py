"""Training on an instruction cache: the loop feeds the flags through, the response loss falls, and a
backend without masks refuses the cache in one line."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.assemble import open_cache
from engine.cache.build import build_cache
from engine.config import DataConfig, RunConfig
from engine.errors import UserError
from engine.paths import Layout
from engine.run_log import RunLog
from tests.train_support import read_log, run_engine, train_flags


def _cache(root: Path, tmp_path: Path) -> Path:
    source = tmp_path / "pr.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Q{i} add {i} and {i}: ", "response": f"{2 * i}."}) + "\n"
                              for i in range(160)), encoding="utf-8")
    data = DataConfig(source=str(source), tokenizer="bytes", seq_len=32, docs_per_chunk=20)
    return build_cache(data, Layout.resolve(root), workers=1)


def test_a_backend_without_masks_refuses_an_instruction_cache(root: Path, tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.data.cache = str(_cache(root, tmp_path))
    mlx = SimpleNamespace(trains_flags=False, name="mlx", dist=SimpleNamespace(is_main=True))
    with pytest.raises(UserError, match="prompt_response instruction data .* the mlx backend does not train"):
        open_cache(cfg, Layout.resolve(root), mlx, RunLog(events=False, stream=io.StringIO()))  # type: ignore[arg-type]


@pytest.mark.slow
def test_training_on_instruction_data_lowers_the_response_loss(root: Path, tmp_path: Path) -> None:
    cache = _cache(root, tmp_path)
    done = run_engine(root, "train", "--name", "ft", "--cache", str(cache),
                      *train_flags(max_steps=12, eval_interval=6, log_interval=6, lr="1e-2"))
    assert done.returncode == 0, done.stderr
    evals = [e["loss"] for e in read_log(root, "ft", 1) if e["event"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0]

    from engine import eval_data, evaluate, inference

    layout = Layout.resolve(root)  # `packtrain-engine eval` scores the same response tokens the run's eval did
    loaded = inference.load(layout, "ft", device="cpu", precision="fp32")
    count, batch = eval_data.plan(loaded, layout, None)
    data = eval_data.select(loaded, layout, count)
    assert data.flags is not None
    m = evaluate.evaluate(loaded, data.rows, batch, flags=data.flags)
    assert m.loss == pytest.approx(evals[1], rel=1e-5)
    assert m.tokens < data.rows[:, 1:].size
