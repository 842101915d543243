"""Behaviour cloning: an MLP from [frozen visual features + proprioception] to the expert's action.

    policy, info = train_bc_policy(inputs, actions, hidden=(256, 256, 256), epochs=20, seed=0)
    action = policy.act(x)          # float32 [B, A] in [-1, 1]

Inputs are standardised with the training set's mean and std (stored in the policy), so feature
scales of different layers and models need no tuning. Loss: mean squared error on the actions.
Training is deterministic for a given seed on the CPU (own generator for init and shuffling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from totobench.probes.base import POLICY, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec
from totobench.progress import progress_bar


class BCPolicy(nn.Module):
    """MLP (ReLU) on standardised inputs; linear output head; act() clips to [-1, 1]."""

    def __init__(self, in_dim: int, action_dim: int, hidden=(256, 256, 256)):
        super().__init__()
        dims = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], action_dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def act(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """[B, in_dim] -> float32 [B, action_dim] actions clipped to [-1, 1]."""
        x = torch.as_tensor(x, dtype=torch.float32)
        return self(x).clamp_(-1.0, 1.0).numpy()


def train_bc_policy(inputs: torch.Tensor | np.ndarray, actions: torch.Tensor | np.ndarray,
                    hidden=(256, 256, 256), epochs: int = 20, lr: float = 1e-3,
                    weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0
                    ) -> tuple[BCPolicy, dict]:
    """Fit a BCPolicy by MSE with AdamW (cosine learning-rate decay) on inputs [N, D] ->
    actions [N, A]. Returns (policy in eval mode, {"train_mse": final full-set MSE, "steps": n}).
    Raises ValueError on empty or mismatched inputs."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    y = torch.as_tensor(actions, dtype=torch.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"inputs [N, D] and actions [N, A] with N > 0 expected, got {list(x.shape)} and {list(y.shape)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # batch-64 steps of a small MLP: more threads only wait on each other
    try:
        return _fit(x, y, tuple(hidden), epochs, lr, weight_decay, batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(x, y, hidden, epochs, lr, weight_decay, batch_size, seed) -> tuple[BCPolicy, dict]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = BCPolicy(x.shape[1], y.shape[1], hidden)
    policy.mean.copy_(x.mean(0))
    policy.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    n = x.shape[0]
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / max(total, 1))))
    policy.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = torch.mean((policy(x[idx]) - y[idx]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    policy.eval().requires_grad_(False)
    with torch.no_grad():
        mse = float(torch.mean((policy(x) - y) ** 2))
    return policy, {"train_mse": mse, "steps": total}


@dataclass(frozen=True)
class BcMlpSpec(ProbeSpec):
    """`probe:` settings of the behaviour-cloning MLP (see train_bc_policy)."""
    name: str = "bc_mlp"
    pooling: str = "mean"
    hidden: tuple[int, ...] = field(default=(256, 256, 256), metadata={"min": 1, "nonempty": True})
    epochs: int = field(default=10, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0})
    batch_size: int = field(default=64, metadata={"min": 1})


class BcMlpProbe(Probe):
    """train.feats: {layer: inputs [N, D]}, train.targets: expert actions [N, A] -> a policy per layer."""
    Spec = BcMlpSpec
    produces = POLICY

    def fit(self, train: ProbeData, val: ProbeData | None, spec: BcMlpSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        out = {}
        with progress_bar(ctx.console, fields="train mse {task.fields[mse]}", disable=ctx.console is None) as shown:
            job = shown.add_task(f"{ctx.desc or 'BC'} policies (one per layer)", total=len(train.layers), mse="-")
            for layer in train.layers:
                policy, info = train_bc_policy(train.feats[layer], train.targets, hidden=spec.hidden,
                                               epochs=spec.epochs, lr=spec.lr, weight_decay=spec.weight_decay,
                                               batch_size=spec.batch_size, seed=ctx.seed)
                out[layer] = LayerResult(outputs=policy,
                                         facts={"train_mse": info["train_mse"], "train_steps": info["steps"]})
                shown.update(job, advance=1, mse=f"{info['train_mse']:.4f}")
        return out
