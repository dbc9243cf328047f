"""What torch can train with here: device, precision support and library versions, on top of the
framework-free host facts (engine.host).

The same snapshot is printed by `packtrain-engine info`, saved into every run (run.json and the
RunStarted header) so a result can be traced to the hardware that produced it, and shown by the
TUI's environment screen. Sizes are GiB (2**30 bytes).
"""

from __future__ import annotations

import platform
from importlib.metadata import version
from typing import Any

import torch

from engine import host
from engine.paths import Layout
from engine.units import GIB

# CPU flags for native bf16 dot products (AVX512-BF16, AMX, Arm BF16). They say bf16 is supported,
# not that it is faster than fp32 here: engine/backends/torch_precision.py measures that.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def snapshot(layout: Layout) -> dict[str, Any]:
    """Keys per CONTRACTS.md (device, device_name, bf16, ram_*, vram_gb, cpu_count, versions, root,
    disk_free_gb) plus device_count and cpu_capability; values are JSON-safe."""
    facts = host.host_snapshot(layout)
    device, device_name, bf16, vram, count = _accelerator()
    return {
        "device": device,
        "device_name": device_name,
        "device_count": count,
        "bf16": bf16,
        "cpu_capability": _cpu_capability(),
        "ram_total_gb": facts["ram_total_gb"],
        "ram_available_gb": facts["ram_available_gb"],
        "vram_gb": None if vram is None else round(vram / GIB, 2),
        "cpu_count": facts["cpu_count"],
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "python": facts["python"],
        "root": facts["root"],
        "disk_free_gb": facts["disk_free_gb"],
    }


def _accelerator() -> tuple[str, str, bool, int | None, int]:
    """(device, name, bf16, vram bytes, device count): CUDA first, then MPS, then CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return "cuda", props.name, bool(torch.cuda.is_bf16_supported()), int(props.total_memory), torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps", f"Apple {platform.machine()} (MPS)", _mps_bf16(), _mps_memory(), 1
    return "cpu", host.cpu_name(), _cpu_bf16(), None, 1


def _mps_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def _mps_memory() -> int | None:
    """Unified memory: what torch lets one process use, since there is no separate VRAM."""
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    return int(recommended()) if recommended is not None else None


def _cpu_capability() -> str:
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return str(get()) if get is not None else "unknown"


def _cpu_bf16() -> bool:
    """True when this CPU runs bf16 natively, or with AVX512 (torch's CPU bf16 kernels are
    vectorised there); without either it is emulated. Whether it pays is measured, not read here."""
    flags = set((host.cpuinfo("flags", "Features") or "").split())
    if flags.intersection(_CPU_BF16_FLAGS):
        return True
    return _cpu_capability().startswith("AVX512")
