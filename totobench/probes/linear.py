"""Linear probe grid: one linear head per (layer, learning rate, weight decay), trained together.

The dinov2 `AllClassifiers` idea on cached features: every head sees the same batches, so the
whole grid costs one pass over the features per epoch. The heads of a layer share its features,
so their weights sit side by side in one matrix [D, heads * C] and one batched matmul over
layers gives every head's logits.

Protocol: features are standardised per layer (mean/std of the rows being fitted); every head
minimises mean cross-entropy + wd/2 |W|^2 (the objective of scikit-learn's LogisticRegression
with C = 1 / (wd * N)) with Adam and a cosine schedule on train minus a held-out slice. With
`whiten=s` the heads are trained in the decorrelated eigenbasis of the standardised features
(same objective, see `_whitening`): correlated features leave Adam ~100 epochs from the optimum,
decorrelated ones ~15 (benchmarks/probe_grid_real.py). The best
(lr, wd) of each layer is chosen by top-1 on that slice; then (refit=True, the default) one head
per layer is retrained with its chosen hyper-parameters on all of train and reported on val.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from totobench.errors import ConfigError
from totobench.metrics.classification import topk_accuracy, true_class_rank
from totobench.probes.base import (CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec,
                                   classification_results, labels_tensor)
from totobench.probes.grid import GridAdamW, cosine_lr_scale, gather_rows, holdout_split

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_WDS = (1e-4, 1e-2)
CHUNK_ROWS = 16384  # rows standardised at once: bounds memory, keeps per-step work to a few ops
RESIDENT_BYTES = 512 * 2 ** 20  # fitted rows up to this size are normalised once, not once per epoch


class LinearHeads(nn.Module):
    """`heads` linear classifiers per layer: weight [layers, D, heads * C], bias [layers, 1, heads * C]."""

    def __init__(self, num_layers: int, num_heads: int, dim: int, num_classes: int):
        super().__init__()
        self.num_heads, self.num_classes = num_heads, num_classes
        # zero init: the problem is convex, so a deterministic start costs nothing
        self.weight = nn.Parameter(torch.zeros(num_layers, dim, num_heads * num_classes))
        self.bias = nn.Parameter(torch.zeros(num_layers, 1, num_heads * num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [layers, B, D] -> logits [layers, B, heads, C]."""
        logits = torch.baddbmm(self.bias, x, self.weight)
        return logits.view(x.shape[0], x.shape[1], self.num_heads, self.num_classes)

    def select(self, heads: torch.Tensor) -> "LinearHeads":
        """A copy holding head heads[l] of each layer l only."""
        num_layers, dim, _ = self.weight.shape
        chosen = LinearHeads(num_layers, 1, dim, self.num_classes).to(self.weight.device)
        layer = torch.arange(num_layers)
        with torch.no_grad():
            chosen.weight.copy_(self.weight.view(num_layers, dim, self.num_heads, -1)[layer, :, heads])
            chosen.bias.copy_(self.bias.view(num_layers, 1, self.num_heads, -1)[layer, :, heads])
        return chosen


def _standardisation(features: dict, layers: list[int], index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean and std [layers, D] over rows `index`, accumulated chunk by chunk (float64)."""
    dim = features[layers[0]].shape[1]
    total = torch.zeros(len(layers), dim, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(index), CHUNK_ROWS):
        x = torch.stack([gather_rows(features[layer], index[start:start + CHUNK_ROWS], device)
                         for layer in layers]).double()
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    mean = total / len(index)
    std = (total_sq / len(index) - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def _whitening(features: dict, layers: list[int], index: torch.Tensor, device,
               shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A better-conditioned basis for the same problem, per layer, from the rows `index`.

    With z the standardised features and U L U^T the eigendecomposition of their covariance,
    returns mean [layers, D], transform [layers, D, D] = diag(1/std) U (L + s)^-1/2 (s = shrink *
    mean(L)) and penalty [layers, D] = 1 / (L + s). Inputs u = (x - mean) @ transform are
    decorrelated (variance L / (L + s), ~1 for the informative directions), and a head V on u is
    the head W = U (L + s)^-1/2 V on z, so |W|^2 = sum_i penalty_i |V_i|^2: the L2 objective on
    the standardised features is unchanged, only its parametrisation, in which Adam converges fast.
    """
    mean, std = _standardisation(features, layers, index, device)
    dim = features[layers[0]].shape[1]
    gram = torch.zeros(len(layers), dim, dim, dtype=torch.float64, device=device)
    for start in range(0, len(index), CHUNK_ROWS):
        x = torch.stack([gather_rows(features[layer], index[start:start + CHUNK_ROWS], device)
                         for layer in layers])
        z = (x - mean[:, None, :]) / std[:, None, :]
        gram += (z.transpose(1, 2) @ z).double()  # fp32 products per chunk, fp64 sums
    evals, evecs = torch.linalg.eigh(gram / len(index))
    evals = evals.clamp_min(0) + shrink * evals.clamp_min(0).mean(1, keepdim=True)
    evals = evals.clamp_min(1e-12)
    transform = evecs * evals.rsqrt()[:, None, :] / std.double()[:, :, None]
    return mean, transform.float(), evals.reciprocal().float()


def _normalisation(features: dict, layers: list[int], index: torch.Tensor, device, whiten: float | None):
    """(mean, std [layers, D], None) to standardise, or (mean, transform, penalty) with whiten=s (_whitening)."""
    if whiten is None:
        return (*_standardisation(features, layers, index, device), None)
    return _whitening(features, layers, index, device, whiten)


def _batches(features: dict, layers: list[int], index: torch.Tensor, mean, std, batch_size: int, device):
    """Yield (standardised features [layers, B, D], rows [B]) over consecutive slices of index."""
    for start in range(0, len(index), CHUNK_ROWS):
        rows = index[start:start + CHUNK_ROWS]
        x = torch.stack([gather_rows(features[layer], rows, device) for layer in layers])
        x = x - mean[:, None, :]
        # std: [layers, D] per-feature scales (standardise) or [layers, D, D] (whiten)
        x = torch.bmm(x, std) if std.dim() == 3 else x / std[:, None, :]
        for b in range(0, len(rows), batch_size):
            yield x[:, b:b + batch_size], rows[b:b + batch_size]


@torch.no_grad()
def train_linear_heads(features: dict, labels: torch.Tensor, layers: list[int], index: torch.Tensor,
                       lr: torch.Tensor, weight_decay: torch.Tensor, num_classes: int, mean, std, *,
                       epochs: int, batch_size: int, seed: int, device, penalty=None) -> LinearHeads:
    """Train heads with hyper-parameters lr, weight_decay [layers, heads] on rows `index`, same batches for all.

    std: [layers, D] (standardise) or a [layers, D, D] transform with its per-input `penalty`
    [layers, D] (see _whitening): the L2 term of input i is weight_decay * penalty_i."""
    num_layers, num_heads = lr.shape
    heads = LinearHeads(num_layers, num_heads, features[layers[0]].shape[1], num_classes).to(device)
    per_column = lambda t: t[:, None, :, None].expand(-1, 1, -1, num_classes).reshape(num_layers, 1, -1).to(device)
    # weight decay enters the gradient as an L2 penalty, so the optimum is LogisticRegression's
    optimizer = GridAdamW([(heads.weight, per_column(lr), None), (heads.bias, per_column(lr), None)])
    l2 = per_column(weight_decay)
    if penalty is not None:
        l2 = l2 * penalty.to(device)[:, :, None]
    onehot = torch.eye(num_classes, device=device)[labels.to(device)]
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * -(-len(index) // batch_size)
    # when every row fits in one chunk, normalise the rows once instead of once per epoch
    fits = len(index) <= CHUNK_ROWS and num_layers * len(index) * features[layers[0]].shape[1] * 4 <= RESIDENT_BYTES
    resident = next(_batches(features, layers, index, mean, std, len(index), device))[0] if fits else None
    for _ in range(epochs):
        perm = torch.randperm(len(index), generator=generator)
        order = index[perm]
        if resident is not None:
            epoch = ((resident[:, perm[b:b + batch_size]], order[b:b + batch_size])
                     for b in range(0, len(index), batch_size))
        else:
            epoch = _batches(features, layers, order, mean, std, batch_size, device)
        for x, rows in epoch:
            # softmax cross-entropy, gradient written out: d loss / d logits = (softmax - onehot) / B
            grad = heads(x).softmax(-1).sub_(onehot[rows.to(device)][None, :, None, :]).div_(len(rows))
            grad = grad.view(num_layers, len(rows), -1)
            heads.weight.grad = torch.bmm(x.transpose(1, 2), grad).addcmul_(l2, heads.weight)
            heads.bias.grad = grad.sum(1, keepdim=True)
            optimizer.step(cosine_lr_scale(optimizer.steps, total_steps))
    return heads


@torch.no_grad()
def predict(heads: LinearHeads, features: dict, layers: list[int], index: torch.Tensor, mean, std,
            batch_size: int = 1024, device="cpu"):
    """Yield (logits [layers, B, heads, C], rows) of every head over rows `index`, streamed."""
    for x, rows in _batches(features, layers, index, mean, std, batch_size, device):
        yield heads(x), rows


def count_correct(heads: LinearHeads, features: dict, labels: torch.Tensor, layers: list[int],
                  index: torch.Tensor, mean, std, ks=(1,), device="cpu") -> dict[int, torch.Tensor]:
    """{k: correct counts [layers, heads]} of every head on rows `index`."""
    counts = {k: torch.zeros(len(layers), heads.num_heads, dtype=torch.long) for k in ks}
    for logits, rows in predict(heads, features, layers, index, mean, std, device=device):
        rank = true_class_rank(logits, labels[rows][None, :, None].expand(logits.shape[:3]))  # [layers, B, heads]
        for k in ks:
            counts[k] += (rank < k).sum(1).cpu()
    return counts


def fit_linear_grid(train: dict, train_labels: torch.Tensor, val: dict, val_labels: torch.Tensor,
                    num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, epochs: int = 10,
                    batch_size: int = 64, holdout: float = 0.1, refit: bool = True, seed: int = 0,
                    device="cpu", return_scores: bool = False, whiten: float | None = None) -> dict[int, dict]:
    """Linear probes for every layer x lr x wd; choose (lr, wd) per layer on a held-out slice of train.

    train: {layer: features [N, D]} (torch tensors or numpy arrays/memmaps, any float dtype; the
    same D for every layer), train_labels [N]; val: {layer: [M, D]} with the same layers, val_labels [M].
    wds are L2 penalties (mean loss + wd/2 |W|^2, i.e. LogisticRegression's C = 1 / (wd * N)).
    Returns {layer: {"metrics": {"top1", "top5"} on val (fractions), "best_hparams": {"lr", "wd"},
    "select_score": top-1 of the chosen head on the held-out slice}}. refit=True retrains the
    chosen head on all of train before reporting; False reports the head fitted without the slice.
    return_scores=True adds "val_scores": logits [M, C] (fp32, CPU) of the reported head.
    whiten=None trains on the standardised features; a number s >= 0 in their decorrelated
    eigenbasis, eigenvalues shrunk by s x their mean (see _whitening; the objective is the same).
    Deterministic given seed. Raises ConfigError on an empty grid or bad settings.
    """
    if not lrs or not wds:
        raise ConfigError(f"probe.lrs and probe.wds must be non-empty lists, got {list(lrs)} and {list(wds)}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"probe.epochs and probe.batch_size must be >= 1, got {epochs} and {batch_size}")
    if whiten is not None and (isinstance(whiten, bool) or not isinstance(whiten, (int, float)) or whiten < 0):
        raise ConfigError(f"probe.whiten must be null or a number >= 0 (eigenvalue shrinkage), got {whiten!r}")
    layers = list(train)
    if set(val) != set(layers):
        raise ValueError(f"train and val must hold the same layers, got {sorted(train)} and {sorted(val)}")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    val_labels = torch.as_tensor(val_labels).long().cpu()
    hparams = [(float(lr), float(wd)) for lr in lrs for wd in wds]
    grid_lr = torch.tensor([lr for lr, _ in hparams]).expand(len(layers), -1)
    grid_wd = torch.tensor([wd for _, wd in hparams]).expand(len(layers), -1)
    common = dict(epochs=epochs, batch_size=batch_size, seed=seed, device=device)

    fit_idx, holdout_idx = holdout_split(train_labels, holdout, seed)
    mean, std, common["penalty"] = _normalisation(train, layers, fit_idx, device, whiten)
    heads = train_linear_heads(train, train_labels, layers, fit_idx, grid_lr, grid_wd, num_classes, mean, std, **common)
    select = count_correct(heads, train, train_labels, layers, holdout_idx, mean, std, device=device)[1] / len(holdout_idx)
    best = select.argmax(1)  # first maximum: ties go to the earlier (lr, wd) of the grid

    if refit:
        all_idx = torch.arange(len(train_labels))
        mean, std, common["penalty"] = _normalisation(train, layers, all_idx, device, whiten)
        heads = train_linear_heads(train, train_labels, layers, all_idx, grid_lr.gather(1, best[:, None]),
                                   grid_wd.gather(1, best[:, None]), num_classes, mean, std, **common)
    else:
        heads = heads.select(best)
    out = {layer: {"best_hparams": {"lr": hparams[best[li]][0], "wd": hparams[best[li]][1]},
                   "select_score": select[li, best[li]].item()} for li, layer in enumerate(layers)}
    val_index = torch.arange(len(val_labels))
    if return_scores:
        scores = torch.cat([logits[:, :, 0].cpu() for logits, _ in predict(heads, val, layers, val_index, mean, std,
                                                                            device=device)], dim=1)
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = topk_accuracy(scores[li], val_labels, (1, 5))
            out[layer]["val_scores"] = scores[li]
    else:
        counts = count_correct(heads, val, val_labels, layers, val_index, mean, std, ks=(1, 5), device=device)
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = {f"top{k}": counts[k][li, 0].item() / len(val_labels) for k in (1, 5)}
    return out


@dataclass(frozen=True)
class LinearSpec(ProbeSpec):
    """`probe:` settings of the linear grid (see fit_linear_grid)."""
    name: str = "linear"
    pooling: str = "mean"
    lrs: tuple[float, ...] = field(default=(0.1, 0.03, 0.01, 0.003, 0.001), metadata={"gt": 0, "nonempty": True})
    wds: tuple[float, ...] = field(default=(1e-4, 1e-2), metadata={"min": 0, "nonempty": True})
    whiten: float | None = field(default=0.01, metadata={"min": 0})   # heads in the decorrelated eigenbasis: 15 epochs, not 100
    epochs: int = field(default=15, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    holdout: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    refit: bool = True
    searched: ClassVar[tuple[str, ...]] = ("lrs", "wds")


class LinearProbe(Probe):
    Spec = LinearSpec
    produces = CLASS_SCORES

    def deviations(self, spec: LinearSpec) -> list[str]:
        return [f"linear probe on {spec.pooling}-pooled tokens: the paper's average-pooling ablation "
                f"(53.2 vs 61.1 top-1 for its attention pooling), not its protocol"]

    def fit(self, train: ProbeData, val: ProbeData, spec: LinearSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        out = fit_linear_grid(train.feats, labels_tensor(train), val.feats, labels_tensor(val), train.num_classes,
                              lrs=spec.lrs, wds=spec.wds, epochs=spec.epochs, batch_size=spec.batch_size,
                              holdout=spec.holdout, refit=spec.refit, seed=ctx.seed, device=ctx.device,
                              return_scores=ctx.keep_outputs, whiten=spec.whiten)
        return classification_results(out)
