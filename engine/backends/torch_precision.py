"""Which precision a run trains in: the whole policy, so the engine, `info` and the TUI agree.

An explicit precision is used as given (fp16 only on CUDA, which has the gradient scaler it needs).
`auto` on CUDA is bf16 where the GPU supports it, else fp16: both are far faster than fp32 there.
On a CPU (and MPS) no rule read from flags is right everywhere: bf16 autocast runs at 2x fp32 on a
Xeon with AMX, 0.6x on one with only AVX512-BF16, slower still where bf16 is emulated. So `auto`
measures: a probe times a forward and backward of one layer of the run's own shape (hidden size,
heads, seq_len, a few rows of the micro-batch) in fp32 and in bf16 autocast, and bf16 is chosen
only when it is clearly faster. The measurement is cached in <root>/cache/precision.json under a
key of the device, CPU model, threads, torch version and shape, so it runs once per machine and
setup; a new torch, another machine or another model shape measures again.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import host
from engine.atomic import atomic_write_json, read_json
from engine.backends.torch_model import autocast, build_model
from engine.errors import UserError
from engine.model_config import complete, llama_config

if TYPE_CHECKING:
    from engine.config import RunConfig
    from engine.paths import Layout

BF16_MIN_SPEEDUP = 1.1  # bf16 gives up precision, so it has to win clearly, not by noise
PROBE_TOKENS = 512  # rows x seq_len per probe step: enough for the step's matmul shapes, cheap to run
PROBE_VOCAB = 256  # the embedding is a lookup; the probe times the layer, not the vocabulary
SHAPE_VOCAB = 3  # smallest vocabulary that holds LlamaConfig's default bos/eos ids, to read a shape
PROBE_SECONDS = 0.5  # timed repetitions stop after this, once each precision ran once
PROBE_REPS = 3
CLEAR_RATIO = 2.0  # a speed ratio this far from 1 is not noise: no more repetitions needed
CACHE_FORMAT = 1
CACHE_ENTRIES = 64  # oldest measurements are dropped past this


@dataclass(frozen=True)
class ProbeShape:
    """What a step's cost depends on: one decoder layer of the run's model at its sequence length."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    seq_len: int
    rows: int

    def key(self) -> str:
        return (f"d{self.hidden} ffn{self.intermediate} heads {self.heads}/{self.kv_heads} "
                f"seq {self.seq_len} x {self.rows} rows")


@dataclass(frozen=True)
class Measurement:
    """Milliseconds of one probe step in each precision; bf16_ms is None when bf16 failed."""

    fp32_ms: float
    bf16_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str
    measured: Measurement | None = None


def probe_shape(cfg: "RunConfig") -> ProbeShape:
    """The run's layer shape with at most PROBE_TOKENS tokens: rows of the micro-batch, and a
    sequence cut to PROBE_TOKENS when longer (the matmuls keep the run's sizes)."""
    c = complete(llama_config(cfg.model, SHAPE_VOCAB, cfg.data.seq_len, {}))  # the vocabulary does not enter the probe
    seq_len = min(cfg.data.seq_len, PROBE_TOKENS)
    rows = max(1, min(cfg.train.micro_batch, PROBE_TOKENS // seq_len))
    return ProbeShape(hidden=c["hidden_size"], intermediate=c["intermediate_size"], heads=c["num_attention_heads"],
                      kv_heads=c["num_key_value_heads"], seq_len=seq_len, rows=rows)


def machine_key(device: str, shape: ProbeShape) -> str:
    """What a measurement is valid for: another CPU, thread count, torch or shape measures again."""
    return (f"{device} | {host.cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
            f"{shape.key()}")


def choose(requested: str, device: str, cfg: "RunConfig", layout: "Layout") -> Choice:
    """The precision to train in and why; probes (or reads the cached probe) only for `auto`
    on a CPU or MPS."""
    if requested == "fp16" and device != "cuda":
        raise UserError(f"precision fp16 needs a CUDA GPU (it trains with a gradient scaler); use bf16 or fp32 on {device}")
    if requested != "auto":
        return Choice(requested, "set in the config")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", "CUDA GPU with bf16 support")
        return Choice("fp16", "CUDA GPU without bf16: fp16 with a gradient scaler")
    shape = probe_shape(cfg)
    key = machine_key(device, shape)
    path = layout.precision_cache
    entries = _read_entries(path)
    measured = _entry(entries.get(key))
    cached = measured is not None
    if measured is None:
        measured = run_probe(device, shape)
        entries[key] = {**asdict(measured), "measured_at": time.time()}
        _write_entries(path, entries)
    precision, why = decide(measured, shape)
    return Choice(precision, f"{why}, measured {'earlier' if cached else 'now'} on {device}", measured)


def decide(m: Measurement, shape: ProbeShape) -> tuple[str, str]:
    """(precision, why) from a probe's timings: bf16 only when it works and is clearly faster."""
    if m.bf16_ms is None:
        return "fp32", f"bf16 autocast failed ({m.error})"
    speedup = m.fp32_ms / m.bf16_ms
    precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return precision, (f"bf16 autocast ran {speedup:.2f}x fp32 (fp32 {m.fp32_ms:.1f} ms, bf16 {m.bf16_ms:.1f} ms "
                       f"for one layer, {shape.key()}; bf16 needs {BF16_MIN_SPEEDUP:.2f}x)")


def _read_entries(path: Path) -> dict[str, Any]:
    """The cached measurements; a missing, torn or foreign file is an empty cache, never an error."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return dict(data["entries"])


def _entry(raw: Any) -> Measurement | None:
    if not isinstance(raw, dict):
        return None
    fp32, bf16, error = raw.get("fp32_ms"), raw.get("bf16_ms"), raw.get("error")
    if not _positive_number(fp32) or not (bf16 is None or _positive_number(bf16)):
        return None
    return Measurement(float(fp32), None if bf16 is None else float(bf16), error if isinstance(error, str) else None)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _write_entries(path: Path, entries: dict[str, Any]) -> None:
    """Best effort: a read-only root only means the next run measures again."""
    newest = sorted(entries.items(), key=lambda kv: _entry_time(kv[1]), reverse=True)[:CACHE_ENTRIES]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": CACHE_FORMAT, "entries": dict(newest)})


def _entry_time(raw: Any) -> float:
    t = raw.get("measured_at") if isinstance(raw, dict) else None
    return float(t) if _positive_number(t) else 0.0


def run_probe(device: str, shape: ProbeShape) -> Measurement:
    """Time one decoder layer's forward and backward in fp32 and bf16 autocast, alternating after
    one warm-up each; the fastest repetition of each counts (other load only slows a run down).
    Repetitions stop once the answer is clear or PROBE_SECONDS have passed: where bf16 is emulated
    one bf16 step costs ten fp32 ones, and the probe must stay cheap."""
    fields = {"vocab_size": PROBE_VOCAB, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
              "num_hidden_layers": 1, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
              "max_position_embeddings": shape.seq_len}
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay untouched
        model = build_model(fields, 0, impl="fast").to(dev)  # the layer that trains by default
        tokens = torch.randint(0, PROBE_VOCAB, (shape.rows, shape.seq_len), device=dev)

    def step(precision: str) -> float:
        _sync(dev)
        started = time.perf_counter()
        with autocast(dev, precision):
            loss = model.hidden_states(tokens).float().square().mean()
        loss.backward()
        _sync(dev)
        took = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{precision} gave a non-finite loss")
        return took

    step("fp32")
    try:
        step("bf16")
    except (RuntimeError, TypeError, FloatingPointError) as e:
        return Measurement(min(step("fp32") for _ in range(2)) * 1000, None, str(e).splitlines()[0][:200])
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    deadline = time.perf_counter() + PROBE_SECONDS
    for rep in range(PROBE_REPS):
        for precision in (("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")):
            times[precision].append(step(precision))
        ratio = min(times["fp32"]) / min(times["bf16"])
        if not 1 / CLEAR_RATIO < ratio < CLEAR_RATIO or time.perf_counter() > deadline:
            break
    return Measurement(min(times["fp32"]) * 1000, min(times["bf16"]) * 1000)


def _sync(dev: torch.device) -> None:
    """MPS runs asynchronously: without a sync the clock would time only the kernel launches."""
    if dev.type == "mps":
        torch.mps.synchronize()
