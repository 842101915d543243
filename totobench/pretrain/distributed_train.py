"""How the transformer is spread over the processes of a torchrun: DDP (every rank holds the whole
model, gradients are averaged) or FSDP (PyTorch's `fully_shard`: parameters, gradients and optimizer
state split over the ranks, one shard group per block plus the root), and the full state dicts a
run saves and resumes from whichever way it was spread.

Outside torchrun (one process) the model is used as it is, whatever `train.sharding` says.
Both DDP and FSDP average gradients over the ranks (divide by the world size); the loss of
`train.train_step` is scaled for that.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from totobench import parallel
from totobench.model.toto import Toto

# Full (unsharded) tensors, gathered to the CPU of rank 0 only: the other ranks get empty dicts.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def wrap_for_training(model: Toto, sharding: str, device: torch.device | None = None) -> torch.nn.Module:
    """The module the training step calls: `model` itself on one process, a DDP wrapper around it,
    or `model` sharded in place by `fully_shard` (each block, then the root) over a mesh of
    `device`'s type. `model` is on `device` already (this rank's: the CPU or cuda:LOCAL_RANK).
    Build the optimizer from the returned module's parameters after this call (FSDP replaces them
    by sharded DTensors)."""
    device = torch.device(device or "cpu")
    if not parallel.info().active:
        return model
    if sharding == "fsdp":
        # named explicitly: fully_shard's default mesh is CUDA whenever a GPU exists, even for a CPU run
        mesh = init_device_mesh(device.type, (parallel.info().world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(train_model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: with sync=False the ranks keep accumulating
    gradients locally (DDP `no_sync`, FSDP `set_requires_gradient_sync(False)`); the last
    micro-batch of a step syncs them."""
    if isinstance(train_model, DistributedDataParallel) and not sync:
        return train_model.no_sync()
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def as_local(value) -> torch.Tensor:
    """A plain tensor from what clip_grad_norm_ returns (a replicated DTensor under FSDP)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), unsharded, parameters named by their model path;
    the same layout for one process, DDP and FSDP, so a run may resume under another sharding.
    Collective under FSDP (every rank calls it); only rank 0 receives the tensors."""
    return (get_model_state_dict(model, options=_FULL_ON_RANK0),
            get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load what `full_state` returned into `model` and `optimizer` (sharded or not). Every rank
    passes the whole dicts (each reads last.pt); an FSDP rank keeps its own shard."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def gathered_model(model: Toto, model_state: dict) -> Toto:
    """A plain (unsharded) Toto to save and evaluate on rank 0: `model` itself unless it is
    FSDP-sharded, else a copy built from the full `model_state` (rank 0's output of `full_state`)."""
    if not isinstance(model, FSDPModule):
        return model
    with torch.random.fork_rng():  # the throw-away random init must not move the training RNG
        plain = Toto(model.config)
    if model_state:  # rank 0; the other ranks never save or evaluate
        plain.load_state_dict(model_state)
    return plain
