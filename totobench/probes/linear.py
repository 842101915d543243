"""Linear probe grid: one linear head per (layer, learning rate, weight decay), trained together.

The dinov2 `AllClassifiers` idea on cached features: every head sees the same batches, so the
whole grid costs one pass over the features per epoch. The weights of all heads live in one
tensor [layers, heads, D, C] and a single einsum gives every head's logits.

Protocol: features are standardised per layer (mean/std of the fitting part), every head is
trained with AdamW and a cosine schedule on train minus a held-out slice, the best (lr, wd) of
each layer is chosen by top-1 on that slice, then (refit=True, the default) one head per layer
is retrained with its chosen hyper-parameters on the whole train split and reported on val.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from totobench.errors import ConfigError
from totobench.metrics.classification import topk_accuracy, topk_correct
from totobench.probes.grid import GridAdamW, cosine_lr_scale, gather_rows, holdout_split

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_WDS = (1e-4, 1e-2)


class LinearHeads(nn.Module):
    """Linear classifiers stacked as weight [layers, heads, D, C]; layer l's heads read layer l's features."""

    def __init__(self, num_layers: int, num_heads: int, dim: int, num_classes: int):
        super().__init__()
        # zero init: the problem is convex, so a deterministic start costs nothing
        self.weight = nn.Parameter(torch.zeros(num_layers, num_heads, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [layers, B, D] -> logits [layers, heads, B, C]."""
        return torch.einsum("lbd,lhdc->lhbc", x, self.weight) + self.bias[:, :, None, :]


def _check_grid(lrs, wds, epochs, batch_size):
    if not lrs or not wds:
        raise ConfigError(f"probe.lrs and probe.wds must be non-empty lists, got {list(lrs)} and {list(wds)}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"probe.epochs and probe.batch_size must be >= 1, got {epochs} and {batch_size}")


def _standardisation(features: dict, layers: list[int], index: torch.Tensor, device, chunk: int = 8192):
    """Per-layer mean and std [layers, D] over rows `index`, accumulated in chunks (memory stays flat)."""
    dim = features[layers[0]].shape[1]
    total = torch.zeros(len(layers), dim, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(index), chunk):
        rows = index[start:start + chunk]
        x = torch.stack([gather_rows(features[layer], rows, device) for layer in layers]).double()
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    mean = total / len(index)
    std = (total_sq / len(index) - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def _batches(features, layers, index, mean, std, batch_size, device):
    """Yield (standardised features [layers, B, D], rows) for consecutive slices of index."""
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        x = torch.stack([gather_rows(features[layer], rows, device) for layer in layers])
        yield (x - mean[:, None, :]) / std[:, None, :], rows


@torch.no_grad()
def train_linear_heads(features: dict, labels: torch.Tensor, layers: list[int], index: torch.Tensor,
                       lr: torch.Tensor, weight_decay: torch.Tensor, num_classes: int, mean, std, *,
                       epochs: int, batch_size: int, seed: int, device) -> LinearHeads:
    """Train heads of shape lr.shape = [layers, heads] on rows `index`, all from the same batches.

    Each head minimises mean cross-entropy + wd/2 * |W|^2 (an L2 penalty, not AdamW's decoupled
    decay): the same objective as scikit-learn's LogisticRegression with C = 1 / (wd * N).
    """
    heads = LinearHeads(len(layers), lr.shape[1], features[layers[0]].shape[1], num_classes).to(device)
    optimizer = GridAdamW([(heads.weight, False), (heads.bias, False)], lr.to(device), torch.zeros_like(lr))
    l2 = weight_decay.to(device)[:, :, None, None]
    generator = torch.Generator().manual_seed(seed)
    labels = labels.to(device)
    total_steps = epochs * -(-len(index) // batch_size)
    for _ in range(epochs):
        order = index[torch.randperm(len(index), generator=generator)]
        for x, rows in _batches(features, layers, order, mean, std, batch_size, device):
            # softmax cross-entropy gradient, written out: d loss / d logits = (softmax - onehot) / B
            grad_logits = heads(x).softmax(-1)
            grad_logits[..., torch.arange(len(rows)), labels[rows.to(device)]] -= 1
            grad_logits /= len(rows)
            heads.weight.grad = torch.einsum("lbd,lhbc->lhdc", x, grad_logits) + l2 * heads.weight
            heads.bias.grad = grad_logits.sum(2)
            optimizer.step(cosine_lr_scale(optimizer.steps, total_steps))
    return heads


@torch.no_grad()
def predict(heads: LinearHeads, features: dict, layers: list[int], index: torch.Tensor, mean, std,
            batch_size: int = 1024, device="cpu"):
    """Yield (logits [layers, heads, B, C], rows) of every head over rows `index`, streamed."""
    for x, rows in _batches(features, layers, index, mean, std, batch_size, device):
        yield heads(x), rows


def count_correct(heads: LinearHeads, features: dict, labels: torch.Tensor, layers: list[int],
                  index: torch.Tensor, mean, std, ks=(1,), device="cpu") -> dict[int, torch.Tensor]:
    """{k: correct counts [layers, heads]} of every head on rows `index`."""
    counts = {k: torch.zeros(heads.weight.shape[:2], dtype=torch.long) for k in ks}
    for logits, rows in predict(heads, features, layers, index, mean, std, device=device):
        for li in range(logits.shape[0]):
            for hi in range(logits.shape[1]):
                for k, n in topk_correct(logits[li, hi], labels[rows], ks).items():
                    counts[k][li, hi] += n
    return counts


def fit_linear_grid(train: dict, train_labels: torch.Tensor, val: dict, val_labels: torch.Tensor,
                    num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, epochs: int = 50,
                    batch_size: int = 256, holdout: float = 0.1, refit: bool = True, seed: int = 0,
                    device="cpu", return_scores: bool = False) -> dict[int, dict]:
    """Linear probes for every layer x lr x wd; choose (lr, wd) per layer on a held-out slice of train.

    train: {layer: features [N, D]} (torch tensors or numpy arrays/memmaps, any float dtype; the
    same D for every layer), train_labels [N]; val: {layer: [M, D]} with the same layers, val_labels [M].
    Returns {layer: {"metrics": {"top1", "top5"} on val (fractions), "best_hparams": {"lr", "wd"},
    "select_score": top-1 of the chosen head on the held-out slice}}. refit=True retrains the
    chosen head on all of train before reporting; False reports the head fitted without the slice.
    return_scores=True adds "val_scores": logits [M, C] (fp32, CPU) of the reported head.
    Deterministic given seed. Raises ConfigError on an empty grid or bad settings.
    """
    _check_grid(lrs, wds, epochs, batch_size)
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
    mean, std = _standardisation(train, layers, fit_idx, device)
    heads = train_linear_heads(train, train_labels, layers, fit_idx, grid_lr, grid_wd, num_classes, mean, std, **common)
    select = count_correct(heads, train, train_labels, layers, holdout_idx, mean, std, device=device)[1] / len(holdout_idx)
    best = select.argmax(1)  # first maximum: ties go to the earlier (lr, wd) of the grid

    if refit:
        all_idx = torch.arange(len(train_labels))
        mean, std = _standardisation(train, layers, all_idx, device)
        heads = train_linear_heads(train, train_labels, layers, all_idx, grid_lr.gather(1, best[:, None]),
                                   grid_wd.gather(1, best[:, None]), num_classes, mean, std, **common)
    else:
        with torch.no_grad():
            chosen = LinearHeads(len(layers), 1, heads.weight.shape[2], num_classes).to(device)
            chosen.weight.copy_(heads.weight[torch.arange(len(layers)), best][:, None])
            chosen.bias.copy_(heads.bias[torch.arange(len(layers)), best][:, None])
        heads = chosen
    out = {layer: {"best_hparams": {"lr": hparams[best[li]][0], "wd": hparams[best[li]][1]},
                   "select_score": select[li, best[li]].item()} for li, layer in enumerate(layers)}
    val_index = torch.arange(len(val_labels))
    if return_scores:
        scores = torch.cat([logits[:, 0].cpu() for logits, _ in predict(heads, val, layers, val_index, mean, std,
                                                                         device=device)], dim=1)
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = topk_accuracy(scores[li], val_labels, (1, 5))
            out[layer]["val_scores"] = scores[li]
    else:
        counts = count_correct(heads, val, val_labels, layers, val_index, mean, std, ks=(1, 5), device=device)
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = {f"top{k}": counts[k][li, 0].item() / len(val_labels) for k in (1, 5)}
    return out
