"""Multi-process runs under `torchrun`: rank 0 runs the tasks, every rank extracts features.

    torchrun --nproc_per_node=2 -m totobench run --model toto-tiny --tasks imagenet ...

`init_from_env` starts a process group (gloo on CPU, NCCL on CUDA) when torchrun's WORLD_SIZE
is above 1. Rank 0 then runs the tasks exactly as one process would; each time it needs
features it broadcasts an extraction job (the dataset and settings, pickled), every rank
extracts its share of the batches into checked cache entries, and rank 0 assembles them by
dataset index - so the order of samples, and therefore every number, is the single-process
run's. The other ranks sit in `serve_extraction` until rank 0 says stop, then exit 0.
Only rank 0 trains probes and writes result files. The feature cache folder must be shared by
all ranks (the same machine, or a shared file system).
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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
        from totobench.errors import ConfigError
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


def picklable(obj: Any) -> bool:
    """Whether a dataset can be shipped to the other ranks."""
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means: extract on rank 0 alone
        return False
    return True


# --- the job protocol between rank 0 and the others -----------------------------------------

STOP = {"op": "stop"}


def send_job(job: dict) -> None:
    """Rank 0: hand an extraction job (or STOP) to every other rank."""
    broadcast_object(job)


def serve_extraction(backbone, device: torch.device) -> int:
    """Ranks > 0: run the extraction jobs rank 0 broadcasts until it sends STOP; returns 0."""
    from totobench.features.extract import run_extraction_job
    while True:
        job = broadcast_object(None)
        if job is None or job.get("op") == "stop":
            return 0
        try:
            report = run_extraction_job(backbone, job, device, rank=_STATE.rank, world_size=_STATE.world_size)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which raises it as one line
            from totobench.errors import TotobenchError
            report = {"error": f"rank {_STATE.rank}: {err}", "user_error": isinstance(err, TotobenchError)}
        gather_objects(report)
