"""Process groups under `torchrun`: the one set-up every multi-process path uses.

`init_from_env` joins the group torchrun describes (gloo on CPU, NCCL on CUDA, each rank on
`cuda:LOCAL_RANK`); outside torchrun (WORLD_SIZE unset or 1) everything here is a no-op, so the
same code runs as one process. Evaluation (`totobench run`) and pre-training both start here.
Collectives on that group: `broadcast_object` / `gather_objects` (pickled objects) and
`all_reduce_sum` (tensors coalesced into one flat buffer per dtype: what data-parallel probes use).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from totobench.errors import ConfigError, shown

# Rank 0 may train probes for a long time while the others wait for the next job; a dead
# peer is still noticed at once (its sockets close), so the wait itself may be long.
WAIT_TIMEOUT = _dt.timedelta(hours=int(os.environ.get("TOTOBENCH_DIST_TIMEOUT_HOURS", "12")))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


_STATE = DistInfo()


def info() -> DistInfo:
    """This process's rank and the world size (world size 1 outside torchrun)."""
    return _STATE


def init_from_env(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR.

    Returns (info, device): on CUDA each rank takes `cuda:LOCAL_RANK`. Does nothing (world
    size 1) when WORLD_SIZE is unset or 1."""
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _STATE, device
    if dist.is_initialized():
        return _STATE, device
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start multi-process runs "
                          f"with `torchrun --nproc_per_node=N -m totobench run ...`")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=WAIT_TIMEOUT,
                            **({"device_id": device} if backend == "nccl" else {}))
    _STATE = DistInfo(rank=rank, world_size=world, local_rank=local_rank)
    return _STATE, device


def shutdown() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = DistInfo()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled). Identity when not distributed."""
    if not _STATE.active:
        return obj
    box = [obj if _STATE.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank. [obj] when not distributed."""
    if not _STATE.active:
        return [obj]
    out: list[Any] = [None] * _STATE.world_size
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where collective buffers live: the rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sum over ranks of each tensor (new tensors, same shapes, dtypes and devices), coalesced
    into one flat buffer per dtype: one collective for many small tensors (the heads' gradients).
    Every rank receives the same bytes. The tensors themselves when not distributed."""
    if not _STATE.active:
        return list(tensors)
    device = _collective_device()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        picked = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in picked])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, part in zip(picked, flat.split([tensors[i].numel() for i in picked])):
            out[i] = part.view(tensors[i].shape).to(tensors[i].device)
    return out


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if _STATE.active:
        dist.barrier()


def parse_device(text: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` -> a usable torch.device; ConfigError naming --device otherwise."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text.strip()):
        raise ConfigError(f"--device {shown(text)}: expected cpu, cuda or cuda:N")
    device = torch.device(text.strip())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
