"""What every probe grid shares: the held-out selection slice, a per-head AdamW, the lr schedule.

A "grid" trains many heads at once. Their weights are stacked on leading axes (one index per
head), so one tensor op serves every head and each head keeps its own learning rate and decay.
"""

from __future__ import annotations

import math

import torch

from totobench.errors import ConfigError, DataError
from totobench.features.stream import gather_rows  # noqa: F401 - the probes' row reader lives with the rows


def holdout_split(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split train items into (fit, holdout) index tensors, stratified by class, deterministic in seed.

    Each class gives round(fraction * its count) random items to the holdout slice. Both index
    tensors are sorted ascending (cheap reads from memory-mapped features).
    Raises ConfigError when fraction is not in (0, 1), DataError when a slice would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"probe.holdout must be a fraction in (0, 1), got {fraction}")
    labels = torch.as_tensor(labels).long().cpu()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    shuffled = labels[order]
    # position of each shuffled item within its class: a stable sort groups classes, keeps shuffle order
    by_class = torch.sort(shuffled, stable=True).indices
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(labels)) - starts[shuffled[by_class]]
    take = torch.floor(counts.double() * fraction + 0.5).long()
    # small classes round to 0: top up one item at a time (largest classes first, each keeping
    # >= 1 item to fit) until the slice holds round(fraction * N) items, at least 1
    target = max(1, int(len(labels) * fraction + 0.5))
    for c in torch.argsort(counts, descending=True, stable=True).tolist() * 2:
        if int(take.sum()) >= target:
            break
        if counts[c] - take[c] > 1:
            take[c] += 1
    is_holdout = rank < take[shuffled]
    fit, holdout = order[~is_holdout].sort().values, order[is_holdout].sort().values
    if len(fit) == 0 or len(holdout) == 0:
        raise DataError(f"train split has {len(labels)} items: a {fraction:.0%} held-out slice "
                        f"leaves {len(fit)} to fit and {len(holdout)} to select on (need >= 1 each)")
    return fit, holdout


def cosine_lr_scale(step: int, total_steps: int | None, warmup_steps: int = 0) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at total_steps (None: constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class GridAdamW:
    """AdamW over stacked heads: every parameter comes with its own lr (and decay) tensor that
    broadcasts against it, so each head's slice of a shared tensor gets its own hyper-parameters.

    params: list of (parameter, lr, weight_decay or None); decay is decoupled (AdamW).
    """

    def __init__(self, params: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        for p, lr, wd in params:  # expand() raises when a hyper-parameter tensor does not fit its parameter
            lr.expand(p.shape), None if wd is None else wd.expand(p.shape)
        self.params = [p for p, _, _ in params]
        self.lrs = [lr.to(p.device, p.dtype) for p, lr, _ in params]
        self.wds = [None if wd is None else wd.to(p.device, p.dtype) for p, _, wd in params]
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0):
        self.steps += 1
        beta1, beta2 = self.betas
        # bias corrections folded into the step size and eps, as torch.optim.Adam does
        step_size = lr_scale * math.sqrt(1 - beta2 ** self.steps) / (1 - beta1 ** self.steps)
        eps = self.eps * math.sqrt(1 - beta2 ** self.steps)
        for p, lr, wd, m, v in zip(self.params, self.lrs, self.wds, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            if wd is not None:
                p.mul_(1 - lr_scale * lr * wd)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m * (lr * step_size), v.sqrt().add_(eps), value=-1.0)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": [t.clone() for t in self.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict):
        self.steps = int(state["steps"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src)
