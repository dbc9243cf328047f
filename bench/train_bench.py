"""Training-speed benchmark: the engine against a reference GPT and bare loops, in one run.

Four sides train the same shape on the same batches, runs alternating (A/B/C/D, rotated each
repetition) because other processes share the machine:
- reference GPT: a nanoGPT-style model and loop (bench/reference_gpt.py), the same d_model, layers,
  heads and vocab with a 4 x d GELU MLP and learned positions: the PyTorch anyone would write;
- bare HF: transformers' LlamaForCausalLM in a plain loop (lm_loss, clipping, torch.optim.AdamW as
  a user writes it: fused on CUDA, torch's default elsewhere, like the reference GPT);
- bare fast: packtrain's lean Llama (engine/backends/torch_fast_llama.py) in the same plain loop with
  the engine's AdamW (engine/backends/torch_optim.py), so engine / bare fast is the engine's overhead;
- engine: `packtrain-engine train` in-process, its own reported tok/s (data order and reads, LR,
  logging, control polling included).
Each run takes `--steps` steps; the second half is timed. Figures are medians over `--reps`, as
wall-clock tok/s and as tokens per CPU-second of this process (what other processes move least).
Every goal of the performance issue is printed as a ratio against a baseline of the same run:
engine / bare transformers loop, engine / reference GPT, engine overhead over the bare fast loop,
the data loader's share of step time (with the run's shuffle window), what precision `auto` picks
here and why, checkpoint save time, resume to first step in a new process (against its own model
load and a bare `import torch`), and the peak RSS of a training step per preset next to
bench/memory_plan.py's plan.

The default shape is the fixed 13.8M model (vocab 8192, 6 layers, d_model 384, 6 heads, ffn 1024,
tied embeddings, seq 256, micro-batch 8, ~89.7 MFLOP/token); `--preset` takes an engine preset.

    python bench/train_bench.py                      # fp32 and bf16 (bf16 skipped where it is emulated)
    python bench/train_bench.py --reps 5 --steps 12  # steadier medians
    python bench/train_bench.py --compile            # every side under torch.compile, and its warm-up cost
    python bench/train_bench.py --device cuda --preset 124M --seq-len 1024 --micro-batch 16 --precisions bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import reference_gpt  # noqa: E402
from engine.assemble import new_run  # noqa: E402
from engine.backends.torch_backend import TorchBackend, make_optimizer  # noqa: E402
from engine.backends.torch_model import autocast, build_model, lm_loss, param_groups  # noqa: E402
from engine.checkpoint import Checkpointer  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.data import read_sequences, rank_slice  # noqa: E402
from engine.model_config import llama_config, read_config_json  # noqa: E402
from engine.paths import Layout  # noqa: E402
from engine.presets import get_preset, llama_param_count  # noqa: E402
from engine.train import Options  # noqa: E402

FIXED = {"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
         "num_attention_heads": 6, "num_key_value_heads": 6, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0}
SIDES = ("gpt", "hf", "fast", "engine")
LABELS = {"gpt": "reference GPT (nanoGPT-style)", "hf": "bare transformers Llama loop", "fast": "bare fast-Llama loop",
          "engine": "packtrain engine (own tok/s)"}
# Dense bf16 tensor-core peaks (TFLOP/s) for MFU on known GPUs; others use the matmul peak measured here.
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


@dataclass
class Bench:
    root: Path
    device: str
    model: dict[str, Any]  # LlamaConfig kwargs of the shape under test
    seq: int
    micro: int
    steps: int
    compile: bool
    source: str = "stdlib"  # what the engine's cache is built from (bytes tokenizer)

    @property
    def half(self) -> int:
        return self.steps // 2

    @property
    def window_tokens(self) -> int:
        return (self.steps - self.half) * self.micro * self.seq

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass
class Result:
    wall: float  # tokens per wall second over the timed half
    cpu: float  # tokens per CPU-second of this process over the same steps
    warmup_excess_s: float = 0.0  # first half's time over the timed half's: compilation, mostly
    device_peak_gb: float = 0.0
    loader_wait: float = 0.0  # share of the timed steps' wall time the loop waited for rows (engine only)
    loader_busy: float = 0.0  # the prefetch worker's reading time over the same wall time
    extra: dict[str, Any] = field(default_factory=dict)


def matmul_peak(dtype: torch.dtype, device: str) -> float:
    """Best GFLOP/s over square and step-shaped matmuls (the denominator of MFU)."""
    shapes = ((8192, 8192, 8192), (16384, 768, 3072)) if device == "cuda" else \
        ((2048, 2048, 2048), (2048, 384, 1536), (2048, 384, 8192))
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        reps = 10 if device == "cuda" else 3
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_config(b: Bench, name: str, precision: str) -> RunConfig:
    return RunConfig.from_dict({
        "name": name,
        "model": {"model_config": str(b.root / "model.json")},
        "data": {"source": b.source, "tokenizer": "bytes", "seq_len": b.seq, "eval_chunks": 1, "docs_per_chunk": 4},
        "train": {"micro_batch": b.micro, "grad_accum": 1, "max_steps": b.steps, "precision": precision,
                  "device": b.device, "log_interval": b.half, "save_interval": b.steps, "eval_interval": 10 ** 9,
                  "warmup_steps": 2, "seed": 1, "compile": b.compile},
    })


def engine_run(b: Bench, name: str, precision: str) -> tuple[Result, float, list[dict]]:
    """The engine in this process; clocks read as it emits each step event, so the timed window
    covers everything it does between logs. Also returns the checkpoint save seconds and events."""
    cfg = run_config(b, name, precision)
    marks: list[tuple[float, float, float, float]] = []
    if b.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = new_run(cfg, Layout.resolve(b.root), Options())
        emit = trainer.log.emit
        started = time.perf_counter()

        def timed(event: Any) -> None:
            if event.kind == "step":
                marks.append((time.perf_counter(), time.process_time(), trainer.reader.wait_s, trainer.reader.read_s))
            emit(event)

        trainer.log.emit = timed  # type: ignore[method-assign]
        trainer.run()
    events = [json.loads(line) for line in (b.root / "training_logs" / f"{name}_run_1.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    save = next(e["seconds"] for e in events if e["event"] == "checkpoint_saved")
    (w0, c0, wait0, read0), (w1, c1, wait1, read1) = marks[0], marks[-1]
    return Result(wall=steps[-1]["tokens_per_sec"], cpu=b.window_tokens / (c1 - c0),
                  warmup_excess_s=(w0 - started) - (w1 - w0),
                  device_peak_gb=steps[-1].get("device_mem_gb", 0.0),
                  loader_wait=(wait1 - wait0) / (w1 - w0), loader_busy=(read1 - read0) / (w1 - w0),
                  extra={"impl": type(trainer.backend.net).__module__, "precision": trainer.backend.precision,
                         "window_rows": trainer.s.order.window_rows,
                         "train_sequences": trainer.s.order.n_train_sequences}), save, events


def batches(b: Bench) -> list[torch.Tensor]:
    """The rows the engine trains first, read from its cache (built by the first engine run)."""
    from engine.cache.reader import PackedCache
    from engine.data import DataOrder

    cfg = run_config(b, "bare", "fp32")
    cache = PackedCache(next((b.root / "cache" / "packed_sequences" / str(b.seq)).iterdir()))
    order = DataOrder.start(cfg.train.seed, cache.chunk_sizes, cfg.data.eval_chunks)  # the whole cache in one window
    out, epoch, cursor = [], 0, 0
    for _ in range(b.steps):
        ids, epoch, cursor = order.take(epoch, cursor, b.micro)
        out.append(torch.from_numpy(read_sequences(cache, rank_slice(ids, 0, 1))).to(b.device))
    return out


def bare_step(b: Bench, side: str, precision: str) -> tuple[Callable[[torch.Tensor], None], torch.nn.Module]:
    """One training step of a bare loop: the model, its optimizer, autocast and clipping, nothing else."""
    cfg = run_config(b, "bare", precision)
    dev = torch.device(b.device)
    ctx = lambda: autocast(dev, precision)  # noqa: E731
    m = b.model
    if side == "gpt":
        torch.manual_seed(cfg.train.seed)
        model = reference_gpt.GPT(m["vocab_size"], b.seq, m["num_hidden_layers"], m["hidden_size"],
                                  m["num_attention_heads"]).to(dev)
        opt = reference_gpt.optimizer(model, cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2),
                                      b.device)
        fwd = torch.compile(model) if b.compile else model
        return lambda rows: reference_gpt.train_step(fwd, opt, rows, ctx), model  # type: ignore[arg-type]
    model = build_model(llama_config(cfg.model, b.model["vocab_size"], b.seq, {}), cfg.train.seed, impl=side).to(dev)
    t = cfg.train
    opt = (make_optimizer(model, t, b.device) if side == "fast" else
           torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                             fused=b.device == "cuda" or None))
    fwd = torch.compile(model) if b.compile else model

    def step(rows: torch.Tensor) -> None:
        with ctx():
            loss = lm_loss(fwd, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def bare_run(b: Bench, side: str, precision: str, rows: list[torch.Tensor]) -> Result:
    if b.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, model = bare_step(b, side, precision)
    marks = {0: (time.perf_counter(), time.process_time())}
    for i, batch in enumerate(rows, start=1):
        step(batch)
        if i in (b.half, b.steps):
            b.sync()
            marks[i] = (time.perf_counter(), time.process_time())
    (started, _), (w0, c0), (w1, c1) = marks[0], marks[b.half], marks[b.steps]
    peak = torch.cuda.max_memory_allocated() / 1e9 if b.device == "cuda" else 0.0
    del model
    return Result(wall=b.window_tokens / (w1 - w0), cpu=b.window_tokens / (c1 - c0),
                  warmup_excess_s=(w0 - started) - (w1 - w0), device_peak_gb=peak)


def flop_per_token(b: Bench, side: str) -> float:
    """bench-notes' formula: 6 N + 12 layers d_model seq, N counted without the position table."""
    m = b.model
    d, layers, vocab = m["hidden_size"], m["num_hidden_layers"], m["vocab_size"]
    if side == "gpt":
        n = vocab * d + layers * (12 * d * d + 2 * d) + d
    else:
        n = llama_param_count(vocab, d, layers, m["num_attention_heads"], m["num_key_value_heads"],
                              m["intermediate_size"], m["tie_word_embeddings"])
    return 6 * n + 12 * layers * d * b.seq


def bf16_refusal() -> str | None:
    """Why bf16 is not worth running here (None when it is): a CPU without native bf16 matmuls
    runs them tens of times slower than fp32, and a step would take minutes. A 512^3 probe decides."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        t = time.perf_counter()
        a @ a
        rates[dtype] = 2 * 512 ** 3 / (time.perf_counter() - t) / 1e9
    fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
    if bf16 * 4 >= fp32:
        return None
    return (f"bf16 matmuls reach {bf16:,.1f} GFLOP/s against {fp32:,.1f} in fp32 on this machine "
            f"({fp32 / bf16:.0f}x slower: no native bf16); --force-bf16 runs it anyway")


def child_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running child has used so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resume_to_first_step(root: Path, name: str) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds from launching `packtrain-engine resume` to its "running" state event (the
    first step begins: imports, model and checkpoint load and data set-up done) and to its first
    step event (that step done too), imports included. The CPU seconds are what other processes on
    a shared machine move least."""
    env = {**os.environ, "PACKTRAIN_HOME": str(root), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "resume", name, "--max-steps", "1000000",
                             "--log-interval", "1", "--events"], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    took = {}
    for line in proc.stdout:
        event = json.loads(line)
        mark = "running" if event["event"] == "state" and event["state"] == "running" else event["event"]
        if mark in ("running", "step") and mark not in took:
            took[mark] = (time.perf_counter() - started, child_cpu_s(proc.pid))
        if mark == "step":
            break
    proc.terminate()
    proc.wait()
    return took


def import_torch_s() -> tuple[float, float]:
    """(wall, CPU) seconds of a bare `import torch` in a new process: the floor under any resume."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import os, torch; t = os.times(); print(t.user + t.system)"],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - started, float(proc.stdout)


def model_load_s(root: Path, name: str) -> float:
    """Seconds to build the model and optimizer and load a checkpoint into them, imports already done:
    the "model load" of the resume goal."""
    layout = Layout.resolve(root)
    cfg = RunConfig.from_dict(json.loads(layout.run_json(name).read_text())["config"])
    checkpointer = Checkpointer(layout, name, log=lambda _: None)
    path = checkpointer.resolve(name)
    started = time.perf_counter()
    backend = TorchBackend(cfg, layout)
    backend.build(read_config_json(path), cfg.train)
    checkpointer.load(path, backend)
    return time.perf_counter() - started


def resume_lines(root: Path, name: str, step_cpu_s: float) -> list[str]:
    """`step_cpu_s`: one steady step's own CPU seconds (from the engine's tokens per CPU-second); a
    process's first step is slower (first-touch allocations, kernel set-up), so both marks print."""
    took = resume_to_first_step(root, name)
    (start_wall, start_cpu), (step_wall, step_cpu) = took["running"], took["step"]
    torch_wall, torch_cpu = import_torch_s()
    load = model_load_s(root, name)
    return [f"resume to the first step's start (new process, imports, model load {load:.2f} s and data set-up "
            f"included): {start_wall:.1f} s wall, {start_cpu:.1f} s CPU (goal <= 3 s + model load); a bare "
            f"`import torch` alone takes {torch_wall:.1f} s wall, {torch_cpu:.1f} s CPU here",
            f"  to the first step's event: {step_wall:.1f} s wall, {step_cpu:.1f} s CPU (that first step "
            f"{step_wall - start_wall:.1f} s wall; a steady step ~{step_cpu_s:.1f} s CPU)"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name}{gpu}, {os.cpu_count()} CPUs, load average {load}"


def report(b: Bench, precision: str, results: dict[str, list[Result]], peak: float, gpu_peak: float | None) -> list[str]:
    med = {s: statistics.median(r.wall for r in rs) for s, rs in results.items()}
    med_cpu = {s: statistics.median(r.cpu for r in rs) for s, rs in results.items()}
    denominator = (gpu_peak * 1e3 if gpu_peak else peak) * 1e9
    lines = [f"{precision}{' + compile' if b.compile else ''}: median of {len(results['engine'])} alternating runs, "
             f"steps {b.half + 1}-{b.steps} of each (matmul peak {peak:,.0f} GFLOP/s measured"
             f"{f', MFU against the {gpu_peak:,.0f} TFLOP/s spec' if gpu_peak else ''})"]
    for side in SIDES:
        walls = " ".join(f"{r.wall:,.0f}" for r in results[side])
        mem = f" | device peak {statistics.median(r.device_peak_gb for r in results[side]):.2f} GB" if b.device == "cuda" else ""
        first = f" | compile ~{statistics.median(r.warmup_excess_s for r in results[side]):.1f}s" if b.compile else ""
        lines.append(f"  {LABELS[side]:32s} {med[side]:>9,.0f} tok/s  ({walls})  {med_cpu[side]:>8,.0f} per CPU-s  "
                     f"MFU {100 * flop_per_token(b, side) * med[side] / denominator:4.1f}%{mem}{first}")
    e = med["engine"]
    lines.append(f"  engine / bare HF {e / med['hf']:.2f}x (goal >= {1.25 if precision == 'fp32' else 1.0:.2f}), "
                 f"engine / reference GPT {e / med['gpt']:.2f}x (goal >= 1.10), "
                 f"engine overhead vs bare fast {100 * (med['fast'] - e) / med['fast']:+.1f}% (goal <= 5%); "
                 f"per CPU-second: {med_cpu['engine'] / med_cpu['hf']:.2f}x, {med_cpu['engine'] / med_cpu['gpt']:.2f}x, "
                 f"{100 * (med_cpu['fast'] - med_cpu['engine']) / med_cpu['fast']:+.1f}%")
    engine = results["engine"]
    extra = engine[0].extra
    lines.append(f"  data loader: the loop waited for rows {100 * statistics.median(r.loader_wait for r in engine):.2f}% "
                 f"of step time (goal <= 1%); the prefetch worker read for "
                 f"{100 * statistics.median(r.loader_busy for r in engine):.2f}% of it beside the steps; shuffle window "
                 f"{extra['window_rows']:,} rows of {extra['train_sequences']:,} training sequences")
    impl = {r.extra.get("impl") for r in engine}
    lines.append(f"  (engine model: {', '.join(sorted(map(str, impl)))})")
    if b.compile:
        lines.append("  (compile ~: the first half's time over the second's; compiled code is reused within a process, "
                     "so the first of the engine and the bare fast loop pays for both)")
    return lines


def memory_lines(presets: list[str], vocab: int, seq: int, micro: int) -> list[str]:
    from memory_plan import measure

    lines = [f"peak RSS per preset (fp32 step of the fast model, seq {seq}, micro-batch {micro}, vocab {vocab}, "
             "fresh process, 1 thread):"]
    for preset in presets:
        m = measure(preset, vocab=vocab, seq_len=seq, micro_batch=micro, checkpointing=False)
        lines.append(f"  {preset:>5}: peak RSS {m['peak_bytes'] / 2**20:,.0f} MiB; the step itself "
                     f"{m['step_bytes'] / 2**20:,.0f} MiB, planned {m['planned_step_bytes'] / 2**20:,.0f} MiB")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per run; the first half is warm-up")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even where this CPU emulates it")
    ap.add_argument("--compile", action="store_true", help="torch.compile on every side")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", help="an engine preset instead of the fixed 13.8M shape")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-presets", default="tiny,5M,25M", help="presets whose step peak RSS is measured ('' for none)")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume-to-first-step measurement")
    ap.add_argument("--source", default="stdlib", help="the engine cache's source (a smaller folder builds faster)")
    args = ap.parse_args()
    if args.steps < 2 or args.steps % 2:
        ap.error("--steps must be an even number >= 2")
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="packtrain-train-bench-"))
    model = get_preset(args.preset).llama_kwargs(args.vocab, args.seq_len) if args.preset else \
        {**FIXED, "vocab_size": args.vocab}
    model["max_position_embeddings"] = args.seq_len
    (root / "model.json").write_text(json.dumps(model))
    b = Bench(root, args.device, model, args.seq_len, args.micro_batch, args.steps, args.compile, args.source)
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; root {root}")
    auto, why = TorchBackend.choose_precision("auto", args.device, run_config(b, "auto", "auto"), Layout.resolve(root))
    print(f"precision auto: {auto} ({why})")

    gpu_peak = next((v for k, v in GPU_PEAKS.items() if k in torch.cuda.get_device_name()), None) \
        if args.device == "cuda" else None
    save_times, first_engine, step_cpu_s = [], None, float("nan")
    for precision in args.precisions.split(","):
        why = None if args.force_bf16 or precision != "bf16" or args.device == "cuda" else bf16_refusal()
        if why:
            print(f"{precision}: skipped: {why}")
            continue
        peak = matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16, args.device)
        results: dict[str, list[Result]] = {s: [] for s in SIDES}
        rows: list[torch.Tensor] | None = None
        for rep in range(args.reps):
            order = SIDES[rep % len(SIDES):] + SIDES[:rep % len(SIDES)]
            if rows is None:  # the engine builds the cache the bare loops read
                order = ("engine",) + tuple(s for s in order if s != "engine")
            for side in order:
                if side == "engine":
                    name = f"bench_{precision}_{rep}"
                    got, save, _ = engine_run(b, name, precision)
                    first_engine = first_engine or name
                    save_times.append(save)
                    rows = rows or batches(b)
                else:
                    got = bare_run(b, side, precision, rows)  # type: ignore[arg-type]
                results[side].append(got)
        print("\n".join(report(b, precision, results, peak, gpu_peak)))
        if precision == "fp32":
            step_cpu_s = b.micro * b.seq / statistics.median(r.cpu for r in results["engine"])
    if save_times:
        print(f"checkpoint save: median {statistics.median(save_times):.2f}s over {len(save_times)} saves")
    if first_engine and not args.no_resume:
        print("\n".join(resume_lines(root, first_engine, step_cpu_s)))
    if args.memory_presets and args.device == "cpu":
        print("\n".join(memory_lines(args.memory_presets.split(","), args.vocab, args.seq_len, args.micro_batch)))


if __name__ == "__main__":
    main()
