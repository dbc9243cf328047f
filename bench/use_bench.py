"""Using a model: generation, time to first token and eval throughput, each against a baseline run
in the same process.

The model is the `5M` preset (vocab 8192 from a `bpe:8192` tokenizer trained on stdlib modules
a-f, seq_len 256), trained for one step by the real engine so it is a real checkpoint. fp32 on CPU.

- Generation: engine.generate.sample (transformers' generate with the KV cache, under
  torch.inference_mode, plus the streamer that decodes text and the stopping criteria) against a
  bare `model.generate` with the same GenerationConfig, greedy, 100 new tokens; then against
  `model.generate` under inference_mode too, which isolates what the streamer and criteria cost.
  Target >= 0.95x.
- Time to first token with the model loaded: from the request (prompt encoding included) to the
  first text event, in wall time and in CPU time of this process. Target < 100 ms.
- Eval: engine.evaluate.evaluate (loss, top-1/top-5, byte counts) against a bare no_grad loop of
  forward + cross-entropy over the same rows. Target >= 0.95x.

Sides alternate and each figure is the median over repetitions; tokens per wall second and per CPU
second of this process (which other processes on the machine barely move) are both shown.

    python bench/use_bench.py [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import generate, inference  # noqa: E402
from engine import protocol as P  # noqa: E402
from engine.assemble import new_run  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.eval_data import select  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.paths import Layout  # noqa: E402
from engine.train import Options  # noqa: E402

SEQ, MICRO, NEW_TOKENS = 256, 8, 100
PROMPT = "def parse_args(argv):\n    "


def train_one_step(root: Path) -> str:
    cfg = RunConfig.from_dict({
        "name": "bench_5M",
        "model": {"preset": "5M"},
        "data": {"source": os.path.join(sysconfig.get_paths()["stdlib"], "[a-f]*.py"), "dataset_name": "stdlib_af",
                 "tokenizer": "bpe:8192", "seq_len": SEQ, "eval_chunks": 1, "docs_per_chunk": 8},
        "train": {"micro_batch": MICRO, "max_steps": 1, "precision": "fp32", "device": "cpu", "save_interval": 1,
                  "eval_interval": 10 ** 9, "warmup_steps": 1},
    })
    with contextlib.redirect_stdout(io.StringIO()):
        new_run(cfg, Layout.resolve(root), Options()).run()
    return "bench_5M"


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(units per wall second, units per CPU second) of one call of fn, which returns its unit count."""
    wall, cpu = time.perf_counter(), time.process_time()
    units = fn()
    return units / (time.perf_counter() - wall), units / max(time.process_time() - cpu, 1e-9)


def alternate(ours: Callable[[], int], theirs: Callable[[], int], reps: int) -> dict[str, float]:
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours))
        b.append(timed(theirs))
    wall = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
    cpu = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
    return {"ours": wall[0], "theirs": wall[1], "ratio": wall[0] / wall[1], "cpu_ratio": cpu[0] / cpu[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        layout = Layout.resolve(root)
        loaded = inference.load(layout, train_one_step(root), device="cpu", precision="fp32")
        print(f"model: {loaded.display_name}, {loaded.n_params:,} parameters, vocab {loaded.vocab_size:,}, "
              f"context {loaded.context}, {torch.get_num_threads()} threads (setup {time.perf_counter() - started:.1f}s)")

        ids = generate.encode(loaded, PROMPT)
        params = P.SamplingParams(temperature=0)
        config = generate.generation_config(params, loaded.eos_id, NEW_TOKENS)
        prompt = torch.tensor([ids])

        def ours() -> int:
            return len(generate.sample(loaded, ids, params, 0, NEW_TOKENS, on_text=lambda text: None).ids)

        def theirs() -> int:
            out = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            return out.shape[1] - len(ids)

        def theirs_inference_mode() -> int:
            with torch.inference_mode():
                return theirs()

        g = alternate(ours, theirs, args.reps)
        print(f"generation, {NEW_TOKENS} new tokens: engine {g['ours']:,.0f} tok/s, transformers generate "
              f"{g['theirs']:,.0f} tok/s: {g['ratio']:.3f}x wall, {g['cpu_ratio']:.3f}x per CPU-second (target >= 0.95x)")
        g = alternate(ours, theirs_inference_mode, args.reps)
        print(f"  the same under torch.inference_mode (the streamer and stopping criteria alone): "
              f"{g['ratio']:.3f}x wall, {g['cpu_ratio']:.3f}x per CPU-second")

        first: list[tuple[float, float]] = []
        for _ in range(args.reps * 2 + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            seen: list[tuple[float, float]] = []

            def on_event(event: P.Event) -> None:
                if isinstance(event, P.Token) and not seen:
                    seen.append((time.perf_counter() - wall, time.process_time() - cpu))

            generate.run(loaded, generate.encode(loaded, PROMPT), P.SamplingParams(max_new_tokens=8, seed=1),
                         emit=on_event)
            first.append(seen[0])
        walls, cpus = [1000 * w for w, _ in first[1:]], [1000 * c for _, c in first[1:]]
        print(f"time to first token (model loaded): median {statistics.median(walls):.1f} ms wall "
              f"(best {min(walls):.1f}), {statistics.median(cpus):.1f} ms of CPU (target < 100 ms)")

        rows = select(loaded, layout, 4 * MICRO, cache=str(layout.cache_dir(SEQ, "stdlib_af"))).rows

        def our_eval() -> int:
            return evaluate(loaded, rows, MICRO).tokens

        def bare_eval() -> int:
            total = 0.0
            with torch.no_grad():
                for start in range(0, len(rows), MICRO):
                    batch = torch.from_numpy(rows[start:start + MICRO])
                    logits = loaded.model(input_ids=batch[:, :-1]).logits
                    total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)).item()
            return len(rows) * SEQ

        e = alternate(our_eval, bare_eval, args.reps)
        print(f"eval, {len(rows) * SEQ:,} tokens: engine {e['ours']:,.0f} tok/s, bare no_grad loop "
              f"{e['theirs']:,.0f} tok/s: {e['ratio']:.3f}x wall, {e['cpu_ratio']:.3f}x per CPU-second "
              "(target >= 0.95x)")


if __name__ == "__main__":
    main()
