"""Training memory per preset, planned from shapes (engine/memory_plan.py), and checked against the
peak RSS of real CPU steps at small scale.

    python bench/memory_plan.py                       # the table: 24 GB GPU, bf16, seq 1024, vocab 32768
    python bench/memory_plan.py --check tiny,5M       # measured step memory vs the plan, on CPU
    python bench/memory_plan.py --gpu-gb 80 --seq-len 2048 --vocab 128256

A measurement runs in a fresh process with glibc's mmap threshold pinned, so freed activations go
back to the OS and the peak resident set (VmHWM, reset between steps) is what one step needs: its
gradients, activations and temporaries over what the weights and optimizer state already hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.memory_plan import GIB, Shapes, largest_micro_batch, plan  # noqa: E402
from engine.presets import PRESETS, get_preset  # noqa: E402


def table(*, vocab: int, seq_len: int, precision: str, gpu_gb: float, reserve_gb: float, micro_batch: int) -> list[str]:
    budget = int((gpu_gb - reserve_gb) * GIB)
    lines = [f"memory plan: {precision}, seq {seq_len}, vocab {vocab}, AdamW, {gpu_gb:g} GB device with "
             f"{reserve_gb:g} GB kept for the CUDA context and allocator slack; activations per micro-batch of "
             f"{micro_batch}",
             f"{'preset':>6} {'params':>8} {'weights':>8} {'grads':>7} {'AdamW':>7} {'autocast':>8} "
             f"{'act':>8} {'act+GC':>8} {'total':>8} {'total+GC':>8} {'max mb':>6} {'max mb+GC':>9}"]
    for name, preset in PRESETS.items():
        s = Shapes.of(preset, vocab)
        p = plan(s, seq_len=seq_len, micro_batch=micro_batch, precision=precision)
        fits = [largest_micro_batch(s, seq_len=seq_len, precision=precision, budget=budget, checkpointing=gc)
                for gc in (False, True)]
        gb = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        lines.append(f"{name:>6} {p.n_params / 1e6:>7.1f}M {gb(p.weights):>8} {gb(p.grads):>7} {gb(p.adamw):>7} "
                     f"{gb(p.autocast_copies):>8} {gb(p.saved):>8} {gb(p.saved_checkpointed):>8} "
                     f"{gb(p.total(False)):>8} {gb(p.total(True)):>8} {fits[0]:>6} {fits[1]:>9}")
    lines.append("(GiB; 'act' is what a micro-batch keeps for backward, 'total' adds weights, AdamW, autocast copies "
                 "and the step's peak of gradients and temporaries; 'max mb' is the largest micro-batch that fits, "
                 "0 = not even one sequence)")
    return lines


def step_memory(preset: str, vocab: int, seq_len: int, micro_batch: int, checkpointing: bool) -> dict[str, Any]:
    """Run in a child: two fp32 training steps of the fast model; the second one's peak RSS over
    the RSS it started from, next to the plan's gradients + activations."""
    import torch

    from engine.backends.torch_model import build_model, lm_loss, param_groups

    torch.set_num_threads(1)
    model = build_model(get_preset(preset).llama_kwargs(vocab, seq_len), 0, impl="fast")
    if checkpointing:
        model.activation_checkpointing_enable()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    rows = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        lm_loss(model, rows).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    peak = _status_kb("VmHWM")
    planned = plan(Shapes.of(get_preset(preset), vocab), seq_len=seq_len, micro_batch=micro_batch, precision="fp32")
    return {"preset": preset, "checkpointing": checkpointing, "start_bytes": start * 1024, "peak_bytes": peak * 1024,
            "step_bytes": (peak - start) * 1024,
            "planned_step_bytes": planned.step_peak(checkpointing)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(preset: str, *, vocab: int, seq_len: int, micro_batch: int, checkpointing: bool) -> dict[str, Any]:
    """step_memory in a fresh process (its own peak RSS, its own allocator state)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, __file__, "--child", preset, "--vocab", str(vocab), "--seq-len", str(seq_len),
            "--micro-batch", str(micro_batch)] + (["--grad-checkpointing"] if checkpointing else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1, help="for the per-micro-batch columns")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--gpu-gb", type=float, default=24.0)
    ap.add_argument("--reserve-gb", type=float, default=1.5)
    ap.add_argument("--check", metavar="PRESETS", help="comma-separated presets to measure on CPU (fp32)")
    ap.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step_memory(args.child, args.vocab, args.seq_len, args.micro_batch, args.grad_checkpointing)))
        return
    if not args.check:
        print("\n".join(table(vocab=args.vocab, seq_len=args.seq_len, precision=args.precision, gpu_gb=args.gpu_gb,
                              reserve_gb=args.reserve_gb, micro_batch=args.micro_batch)))
        return
    for preset in args.check.split(","):
        for gc in (False, True):
            m = measure(preset, vocab=args.vocab, seq_len=args.seq_len, micro_batch=args.micro_batch, checkpointing=gc)
            print(f"{preset} fp32 seq {args.seq_len} mb {args.micro_batch}{' +GC' if gc else ''}: one step took "
                  f"{m['step_bytes'] / 2**20:,.0f} MiB over its starting RSS, planned {m['planned_step_bytes'] / 2**20:,.0f} "
                  f"MiB ({m['step_bytes'] / m['planned_step_bytes']:.2f}x); peak RSS {m['peak_bytes'] / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
