"""Training-engine benchmark: the engine's tokens/s against a bare PyTorch loop in the same run.

Fixed model (vocab 8192, 6 layers, d_model 384, 6 heads, ffn 1024, tied embeddings, seq 256,
micro-batch 8): ~13.8M parameters, ~89.7 MFLOP/token. Both sides train the same initial weights on
the same batches, with the same AdamW groups, clipping and autocast; the difference is what the
engine adds (data order and reads, LR function, logging, control polling, growth checks).

Prints, per precision: engine tok/s, bare tok/s, overhead (target <= 5%), and MFU against the
matmul peak measured in this run; then the checkpoint save time and the resume-to-first-step
time of a `packtrain-engine resume` process. Engine and bare runs alternate, and each figure is
taken over 5-step windows. Two views of the overhead: wall-clock tok/s of the best window of
each side (the one least disturbed by other processes), and the median tokens per CPU-second of
this process, which other processes on the machine barely move.

    python bench/train_bench.py [--steps 20] [--reps 3] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.assemble import new_run, token_ids  # noqa: E402
from engine.backends.torch_model import autocast, build_model, hf_config, lm_loss, param_groups  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.data import read_sequences, rank_slice  # noqa: E402
from engine.model_config import llama_config  # noqa: E402
from engine.paths import Layout  # noqa: E402
from engine.train import Options  # noqa: E402

SEQ, MICRO, LOG_EVERY = 256, 8, 5
MODEL = {"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
         "num_attention_heads": 6, "num_key_value_heads": 6, "max_position_embeddings": SEQ,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def matmul_peak(dtype: torch.dtype) -> float:
    """Best GFLOP/s over the shapes a step of this model runs (square, MLP, LM head)."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (2048, 384, 1536), (2048, 384, 8192)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps = 10
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_config(root: Path, name: str, precision: str, steps: int) -> RunConfig:
    cfg = RunConfig.from_dict({
        "name": name,
        "model": {"model_config": str(root / "model.json")},
        "data": {"source": "stdlib", "tokenizer": "bytes", "seq_len": SEQ, "eval_chunks": 1},
        "train": {"micro_batch": MICRO, "grad_accum": 1, "max_steps": steps, "precision": precision,
                  "device": "cpu", "log_interval": LOG_EVERY, "save_interval": steps, "eval_interval": 10 ** 9,
                  "warmup_steps": 2, "seed": 1},
    })
    return cfg


Window = tuple[float, float]  # (tokens per wall second, tokens per CPU second) over LOG_EVERY steps


def windows(marks: list[tuple[float, float]]) -> list[Window]:
    """Per-window rates from (wall, cpu) clock readings taken after every LOG_EVERY-th step."""
    tokens = LOG_EVERY * MICRO * SEQ
    return [(tokens / (b[0] - a[0]), tokens / (b[1] - a[1])) for a, b in zip(marks, marks[1:])]


def engine_run(root: Path, name: str, precision: str, steps: int) -> tuple[list[Window], float, list[dict]]:
    """(rates of each log window after the first, checkpoint save seconds, events).

    The clocks are read when the engine emits a step event, so the windows cover everything the
    engine does between logs: data, LR, control polling, the log line itself.
    """
    cfg = run_config(root, name, precision, steps)
    marks: list[tuple[float, float]] = []
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = new_run(cfg, Layout.resolve(root), Options())
        emit = trainer.log.emit

        def timed(event: Any) -> None:
            if event.kind == "step":
                marks.append((time.perf_counter(), time.process_time()))
            emit(event)

        trainer.log.emit = timed  # type: ignore[method-assign]
        trainer.run()
    events = [json.loads(line) for line in (root / "training_logs" / f"{name}_run_1.jsonl").read_text().splitlines()]
    save = next(e["seconds"] for e in events if e["event"] == "checkpoint_saved")
    return windows(marks), save, events


def bare_run(root: Path, precision: str, steps: int) -> list[Window]:
    """The same model, batches and update rule as a plain loop: no engine around it."""
    from engine.cache.reader import PackedCache
    from engine.data import DataOrder

    cfg = run_config(root, "bare", precision, steps)
    cache = PackedCache(next((root / "cache" / "packed_sequences" / str(SEQ)).iterdir()))
    order = DataOrder.start(cfg.train.seed, cache.chunk_sizes, cfg.data.eval_chunks)
    batches, epoch, cursor = [], 0, 0
    for _ in range(steps):
        ids, epoch, cursor = order.take(epoch, cursor, MICRO)
        batches.append(torch.from_numpy(read_sequences(cache, rank_slice(ids, 0, 1))))
    model = build_model(hf_config(llama_config(cfg.model, cache.vocab_size, SEQ, token_ids(cache))), cfg.train.seed)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    device = torch.device("cpu")
    marks = []
    for i, rows in enumerate(batches, start=1):
        with autocast(device, precision):
            loss = lm_loss(model, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % LOG_EVERY == 0:
            marks.append((time.perf_counter(), time.process_time()))
    return windows(marks)


def resume_to_first_step(root: Path, name: str) -> float:
    """Seconds from launching `packtrain-engine resume` to its first step event (imports included)."""
    env = {**os.environ, "PACKTRAIN_HOME": str(root), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "resume", name, "--max-steps", "1000000",
                             "--log-interval", "1", "--events"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "step":
            elapsed = time.perf_counter() - started
            break
    proc.terminate()
    proc.wait()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help=f"steps per run; the first {LOG_EVERY} are warm-up")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="packtrain-train-bench-"))
    (root / "model.json").write_text(json.dumps(MODEL))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, root {root}")

    n_params = None
    save_times = []
    for precision in args.precisions.split(","):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak = matmul_peak(dtype)
        engine: list[Window] = []
        bare: list[Window] = []
        for rep in range(args.reps):
            got, save, events = engine_run(root, f"bench_{precision}_{rep}", precision, args.steps)
            engine += got
            save_times.append(save)
            bare += bare_run(root, precision, args.steps)
            n_params = n_params or next(e for e in events if e["event"] == "run")["hardware"]["n_params"]
        flop_per_token = 6 * n_params + 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * SEQ
        e, b = max(w for w, _ in engine), max(w for w, _ in bare)
        ec, bc = statistics.median(c for _, c in engine), statistics.median(c for _, c in bare)
        print(f"{precision}: engine {e:,.0f} tok/s | bare loop {b:,.0f} tok/s | overhead {100 * (b - e) / b:+.1f}% "
              f"(wall, best {LOG_EVERY}-step window of {len(engine)}) | {100 * (bc - ec) / bc:+.1f}% (CPU time, median) | "
              f"MFU engine {100 * flop_per_token * e / (peak * 1e9):.1f}% bare {100 * flop_per_token * b / (peak * 1e9):.1f}% "
              f"(peak {peak:,.0f} GFLOP/s, {flop_per_token / 1e6:.1f} MFLOP/token, {n_params / 1e6:.1f}M params)")
        print(f"  wall medians: engine {statistics.median(w for w, _ in engine):,.0f} bare "
              f"{statistics.median(w for w, _ in bare):,.0f} tok/s; per CPU-second: engine {ec:,.0f} bare {bc:,.0f}")
    print(f"checkpoint save: median {statistics.median(save_times):.2f}s over {len(save_times)} saves")
    took = resume_to_first_step(root, f"bench_{args.precisions.split(',')[0]}_0")
    print(f"resume to first step (new process, imports included): {took:.1f}s")


if __name__ == "__main__":
    main()
