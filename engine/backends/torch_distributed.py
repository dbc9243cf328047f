"""torchrun support: process group setup and the few collectives the loop needs.

Under `torchrun --nproc-per-node N` every rank runs the same engine; DDP averages gradients, the
cursor hands each rank its slice of the global batch, and only rank 0 writes. Outside torchrun
all of this collapses to no-ops, so the single-process loop has no distributed branches.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.backends.base import Dist
from engine.elastic import Elastic


def device(d: Dist, kind: str) -> torch.device:
    """This rank's torch device of `kind` (cuda is per local rank)."""
    return torch.device(kind, d.local_rank) if kind == "cuda" else torch.device(kind)


def init(device_kind: str) -> Dist:
    """Join the process group torchrun set up in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # Pauses are held with periodic collectives, but a long save on rank 0 must not time out.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2), **attempt_store(rank, world))
    return Dist(rank=rank, world_size=world, local_rank=local, backend=backend)


def attempt_store(rank: int, world: int) -> dict[str, Any]:
    """The store this attempt of the group meets in. torchrun's agent keeps one store for the whole
    job, and the keys a previous attempt's ranks left there name their dead sockets, so a group
    restarted after a failure (engine.elastic) would connect to those and fail (pytorch#135712):
    each attempt gets keys of its own. Only on one node: the restart count that names the attempt
    is each node's agent's own, and a node whose workers did not fail keeps its count, so across
    nodes it names no common attempt (there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt
    a fresh store instead). Empty (init_process_group's env:// default) elsewhere."""
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(world)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not one_node:
        return {}
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(hours=2))
    return {"store": dist.PrefixStore(f"attempt_{Elastic.from_env().restart}/", agent), "rank": rank,
            "world_size": world}


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(d: Dist) -> torch.device:
    return torch.device("cuda", d.local_rank) if d.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_flags(d: Dist, flags: list[bool]) -> list[bool]:
    """Per-flag OR across ranks: a signal that reached any rank stops every rank at the same step."""
    if not d.enabled:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_comm_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's JSON-able value on every rank (a decision only rank 0 may take, e.g. which chunks
    are new). JSON bytes in a tensor rather than broadcast_object_list, which pickles."""
    if not d.enabled:
        return obj
    dev = _comm_device(d)
    data = json.dumps(obj).encode() if d.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if d.is_main else \
        torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return obj if d.is_main else json.loads(bytes(buf.cpu().tolist()).decode())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
