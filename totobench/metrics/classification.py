"""Top-k accuracy of classification scores.

Ties are broken deterministically, as a stable sort would: among classes with equal scores the
lower class index ranks first. A k larger than the number of classes counts every item correct.
"""

from __future__ import annotations

import torch


def true_class_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true class among C classes: scores [..., C], labels [...] -> ranks [...].

    Rank = classes scored higher + equal-scored classes with a lower index (a stable sort's order).
    """
    labels = labels.to(scores.device, torch.long)
    true_score = scores.gather(-1, labels[..., None])
    lower_index = torch.arange(scores.shape[-1], device=scores.device) < labels[..., None]
    return (scores > true_score).sum(-1) + ((scores == true_score) & lower_index).sum(-1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of items whose label is among the k best-scored classes, for each k.

    scores [N, C] (any float dtype), labels [N] integer class indices in [0, C).
    Returns {k: count}. Summing counts over batches gives streaming accuracy.
    Raises ValueError on mismatched shapes, labels out of range or k < 1.
    """
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {tuple(scores.shape)} and {tuple(labels.shape)}")
    num_classes = scores.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    rank = true_class_rank(scores, labels)
    return {k: int((rank < k).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Fraction of items whose label is among the k best-scored classes: {"top1": f, "top5": f}.

    scores [N, C], labels [N] (N >= 1). Ties: lower class index first. k > C gives 1.0.
    Raises ValueError on an empty set or the conditions of `topk_correct`.
    """
    if labels.numel() == 0:
        raise ValueError("top-k accuracy of an empty set is undefined")
    return {f"top{k}": n / labels.shape[0] for k, n in topk_correct(scores, labels, ks).items()}
