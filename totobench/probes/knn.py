"""kNN classification on frozen features: cosine similarity, temperature-weighted votes (as in DINO).

Features are L2-normalised, so faiss' exact inner-product index gives cosine similarity. Each
neighbour votes exp(sim / T) for its class. One search at the largest k serves every k. The index
lives on the GPU when the run does and faiss has GPU support (faiss-gpu-cu12, the `gpu` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from totobench.errors import ConfigError
from totobench.metrics.classification import topk_correct
from totobench.probes.base import (CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec,
                                   classification_results, labels_tensor)
from totobench.probes.grid import gather_rows, holdout_split


def _normalised(features) -> np.ndarray:
    """[N, D] (tensor or array, any float dtype) -> contiguous fp32 numpy rows of unit L2 norm."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def flat_ip_index(dim: int, device="cpu"):
    """An exact inner-product faiss index of `dim`-vectors: on the GPU when `device` is CUDA and the
    installed faiss was built with GPU support, else on the CPU."""
    import faiss
    index = faiss.IndexFlatIP(dim)
    device = torch.device(device)
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    return index


def knn_classify(train_feats, train_labels, test_feats, num_classes: int, ks=(10, 20),
                 temperature: float = 0.07, batch_size: int = 4096, device="cpu") -> dict[int, torch.Tensor]:
    """Class scores of every test item from its k nearest train items, for each k.

    train_feats [N, D], train_labels [N], test_feats [M, D] (tensors or arrays).
    Returns {k: scores [M, C] fp32 CPU tensor}: the sum over the k most cosine-similar train
    items of exp(similarity / temperature), per class. A k above N uses all N train items.
    Queries run in chunks of batch_size, so memory stays flat as M grows; the search runs on
    `device` when faiss can (see flat_ip_index), the scores are on the CPU either way.
    Raises ConfigError on an empty ks, a k < 1 or a non-positive temperature.
    """
    if not ks or min(ks) < 1:
        raise ConfigError(f"probe.ks must be a non-empty list of k >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ConfigError(f"probe.temperature must be > 0, got {temperature}")
    train = _normalised(train_feats)
    test = _normalised(test_feats)
    labels = torch.as_tensor(train_labels).long().cpu()
    index = flat_ip_index(train.shape[1], device)
    index.add(train)
    depth = {k: min(k, len(train)) for k in ks}
    max_k = max(depth.values())
    scores = {k: torch.zeros(len(test), num_classes) for k in ks}
    for start in range(0, len(test), batch_size):
        sims, neighbours = index.search(test[start:start + batch_size], max_k)
        votes = torch.exp(torch.from_numpy(sims) / temperature)
        voted = labels[torch.from_numpy(neighbours)]
        running = torch.zeros(len(sims), num_classes)
        done = 0
        # add neighbours rank by rank in increasing k, so each k reuses the smaller k's sums
        for k in sorted(ks, key=lambda k: depth[k]):
            running.scatter_add_(1, voted[:, done:depth[k]], votes[:, done:depth[k]])
            done = depth[k]
            scores[k][start:start + len(sims)] = running
    return scores


def fit_knn_layers(train: dict, train_labels, val: dict, val_labels, num_classes: int, ks=(10, 20),
                   temperature: float = 0.07, holdout: float = 0.1, seed: int = 0,
                   return_scores: bool = False, device="cpu") -> dict[int, dict]:
    """kNN per layer: choose k on a held-out slice of train, report on val with all of train as memory.

    train: {layer: [N, D]}, val: {layer: [M, D]} (same layers), labels [N] and [M].
    Returns {layer: {"metrics": {"top1", "top5"} on val (fractions), "best_hparams": {"k",
    "temperature"}, "select_score": top-1 on the held-out slice with the rest of train as memory}}.
    Ties in the held-out top-1 go to the smaller k. return_scores=True adds "val_scores" [M, C].
    """
    train_labels = torch.as_tensor(train_labels).long().cpu()
    val_labels = torch.as_tensor(val_labels).long().cpu()
    if set(val) != set(train):
        raise ValueError(f"train and val must hold the same layers, got {sorted(train)} and {sorted(val)}")
    fit_idx, holdout_idx = holdout_split(train_labels, holdout, seed)
    ks = sorted(set(int(k) for k in ks))
    out = {}
    for layer, feats in train.items():
        held = knn_classify(gather_rows(feats, fit_idx), train_labels[fit_idx], gather_rows(feats, holdout_idx),
                            num_classes, ks, temperature, device=device)
        select = {k: topk_correct(held[k], train_labels[holdout_idx], (1,))[1] / len(holdout_idx) for k in ks}
        best_k = max(ks, key=lambda k: (select[k], -k))
        scores = knn_classify(feats, train_labels, val[layer], num_classes, (best_k,), temperature,
                              device=device)[best_k]
        correct = topk_correct(scores, val_labels, (1, 5))
        out[layer] = {"metrics": {f"top{k}": n / len(val_labels) for k, n in correct.items()},
                      "best_hparams": {"k": best_k, "temperature": temperature},
                      "select_score": select[best_k]}
        if return_scores:
            out[layer]["val_scores"] = scores
    return out


@dataclass(frozen=True)
class KnnSpec(ProbeSpec):
    """`probe:` settings of kNN (see fit_knn_layers)."""
    name: str = "knn"
    pooling: str = "mean"
    ks: tuple[int, ...] = field(default=(10, 20), metadata={"min": 1, "nonempty": True})
    temperature: float = field(default=0.07, metadata={"gt": 0})
    holdout: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    searched: ClassVar[tuple[str, ...]] = ("ks",)


class KnnProbe(Probe):
    Spec = KnnSpec
    produces = CLASS_SCORES

    def deviations(self, spec: KnnSpec) -> list[str]:
        return [f"k-nearest-neighbour vote on {spec.pooling}-pooled tokens: not in the paper (an extra read-out)"]

    def fit(self, train: ProbeData, val: ProbeData, spec: KnnSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        out = fit_knn_layers(train.feats, labels_tensor(train), val.feats, labels_tensor(val), train.num_classes,
                             ks=spec.ks, temperature=spec.temperature, holdout=spec.holdout, seed=ctx.seed,
                             return_scores=ctx.keep_outputs, device=ctx.device)
        return classification_results(out)
