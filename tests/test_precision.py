"""Precision policy: what `auto` picks from (injected) measurements, when it measures, and the
cache that keeps a measurement per machine, torch version and shape. Timing itself is not tested."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import host
from engine.backends import torch_precision as precision
from engine.backends.torch_precision import Measurement, ProbeShape, choose
from engine.config import RunConfig
from engine.errors import UserError
from engine.paths import Layout


class FakeProbe:
    """Stands in for the timed probe: returns a fixed measurement and records every call."""

    def __init__(self, fp32_ms: float = 100.0, bf16_ms: float | None = 50.0, error: str | None = None) -> None:
        self.result = Measurement(fp32_ms, bf16_ms, error)
        self.calls: list[tuple[str, ProbeShape]] = []

    def __call__(self, device: str, shape: ProbeShape) -> Measurement:
        self.calls.append((device, shape))
        return self.result


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.resolve(tmp_path)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> FakeProbe:
    fake = FakeProbe()
    monkeypatch.setattr(precision, "run_probe", fake)
    return fake


def cfg(micro_batch: int = 8, seq_len: int = 256) -> RunConfig:
    c = RunConfig()
    c.train.micro_batch, c.data.seq_len = micro_batch, seq_len
    return c


@pytest.mark.parametrize(("fp32_ms", "bf16_ms", "expected"), [
    (100.0, 50.0, "bf16"),  # AMX-like: bf16 twice as fast
    (100.0, 166.0, "fp32"),  # AVX512-BF16 without AMX: bf16 at 0.6x
    (100.0, 95.0, "fp32"),  # 1.05x is within noise: not worth bf16's precision
    (100.0, 90.0, "bf16"),  # 1.11x
])
def test_auto_on_a_cpu_picks_the_faster_measured_option(layout: Layout, probe: FakeProbe, fp32_ms: float,
                                                        bf16_ms: float, expected: str) -> None:
    probe.result = Measurement(fp32_ms, bf16_ms)
    choice = choose("auto", "cpu", cfg(), layout)
    assert choice.precision == expected
    assert f"bf16 autocast ran {fp32_ms / bf16_ms:.2f}x fp32" in choice.reason and "measured now on cpu" in choice.reason
    assert choice.measured == probe.result


def test_the_probe_uses_the_runs_own_layer_shape(layout: Layout, probe: FakeProbe) -> None:
    choose("auto", "cpu", cfg(micro_batch=8), layout)
    c = RunConfig()
    c.model.preset, c.data.seq_len, c.train.micro_batch = "25M", 128, 3
    choose("auto", "cpu", c, layout)
    assert [shape for _, shape in probe.calls] == [
        ProbeShape(hidden=256, intermediate=688, heads=4, kv_heads=4, seq_len=256, rows=2),  # 512 tokens at most
        ProbeShape(hidden=512, intermediate=1376, heads=8, kv_heads=8, seq_len=128, rows=3),
    ]


def test_bf16_that_fails_in_the_probe_means_fp32(layout: Layout, probe: FakeProbe) -> None:
    probe.result = Measurement(100.0, None, "bf16 not implemented")
    choice = choose("auto", "cpu", cfg(), layout)
    assert choice.precision == "fp32" and "bf16 autocast failed (bf16 not implemented)" in choice.reason


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_used_without_probing(layout: Layout, probe: FakeProbe, requested: str) -> None:
    choice = choose(requested, "cpu", cfg(), layout)
    assert (choice.precision, choice.reason) == (requested, "set in the config")
    assert probe.calls == [] and not layout.precision_cache.exists()


def test_fp16_needs_cuda(layout: Layout, probe: FakeProbe) -> None:
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        choose("fp16", "cpu", cfg(), layout)
    assert probe.calls == []


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_cuda_needs_no_probe(layout: Layout, probe: FakeProbe, monkeypatch: pytest.MonkeyPatch, bf16: bool,
                             expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert choose("auto", "cuda", cfg(), layout).precision == expected
    assert probe.calls == []


def test_mps_is_measured_too(layout: Layout, probe: FakeProbe) -> None:
    probe.result = Measurement(100.0, 120.0)
    assert choose("auto", "mps", cfg(), layout).precision == "fp32"
    assert probe.calls[0][0] == "mps"


def test_a_measurement_is_cached_per_machine_torch_threads_and_shape(layout: Layout, probe: FakeProbe,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = choose("auto", "cpu", cfg(), layout)
    again = choose("auto", "cpu", cfg(), layout)
    assert len(probe.calls) == 1 and again.precision == first.precision
    assert "measured earlier on cpu" in again.reason
    saved = json.loads(layout.precision_cache.read_text())
    (key,) = saved["entries"]
    assert key.startswith(f"cpu | {host.cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | ")
    assert saved["entries"][key]["fp32_ms"] == 100.0 and saved["entries"][key]["bf16_ms"] == 50.0

    changes = [
        lambda: monkeypatch.setattr(torch, "__version__", "9.9.9"),
        lambda: monkeypatch.setattr(host, "cpu_name", lambda: "Other CPU"),
        lambda: monkeypatch.setattr(torch, "get_num_threads", lambda: 64),
    ]
    for n, change in enumerate(changes, start=2):
        change()
        choose("auto", "cpu", cfg(), layout)
        assert len(probe.calls) == n, "a changed machine or torch reused an old measurement"
        choose("auto", "cpu", cfg(), layout)
        assert len(probe.calls) == n
    choose("auto", "cpu", cfg(micro_batch=1), layout)  # another shape
    assert len(probe.calls) == 5
    assert len(json.loads(layout.precision_cache.read_text())["entries"]) == 5


@pytest.mark.parametrize("content", ["{torn", "[]", '{"format": 99, "entries": {}}',
                                     '{"format": 1, "entries": {"KEY": {"fp32_ms": -1, "bf16_ms": 2}}}',
                                     '{"format": 1, "entries": {"KEY": {"fp32_ms": "fast", "bf16_ms": 2}}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(layout: Layout, probe: FakeProbe, content: str) -> None:
    key = precision.machine_key("cpu", precision.probe_shape(cfg()))
    layout.precision_cache.parent.mkdir(parents=True)
    layout.precision_cache.write_text(content.replace("KEY", key.replace('"', '\\"')))
    assert choose("auto", "cpu", cfg(), layout).precision == "bf16"
    assert len(probe.calls) == 1
    assert json.loads(layout.precision_cache.read_text())["entries"][key]["bf16_ms"] == 50.0


def test_a_read_only_root_still_gets_an_answer(tmp_path: Path, probe: FakeProbe) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    assert choose("auto", "cpu", cfg(), Layout.resolve(tmp_path)).precision == "bf16"


def test_the_cache_keeps_the_newest_entries(layout: Layout, probe: FakeProbe,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "CACHE_ENTRIES", 2)
    for mb in (1, 2, 3):
        choose("auto", "cpu", cfg(micro_batch=mb, seq_len=64), layout)
    entries = json.loads(layout.precision_cache.read_text())["entries"]
    assert sorted(k.rsplit("x ", 1)[1] for k in entries) == ["2 rows", "3 rows"]


def test_the_real_probe_times_both_precisions() -> None:
    """The probe runs on this machine's torch and transformers; how fast is not asserted."""
    m = precision.run_probe("cpu", ProbeShape(hidden=32, intermediate=64, heads=2, kv_heads=2, seq_len=16, rows=2))
    assert m.fp32_ms > 0 and math.isfinite(m.fp32_ms)
    assert m.bf16_ms is None or (m.bf16_ms > 0 and math.isfinite(m.bf16_ms))
