"""Time the linear probe grid against one scikit-learn LogisticRegression per (layer, C).

Both sides fit the same standardised features of every layer and choose their hyper-parameter
per layer on the same held-out 10% of train; the grid trains all (layer x lr x wd) heads in one
pass per epoch, with the settings of the imagenet-linear task (epochs, whitening) unless given.
Prints both wall times, their ratio and both best-layer val top-1.

    nice -n 10 .venv/bin/python benchmarks/probe_grid.py [--layers 8] [--dim 256] [--threads 1]
    .venv/bin/python benchmarks/probe_grid.py --epochs 100 --whiten none   # the grid without whitening
    .venv/bin/python benchmarks/probe_grid.py --real toto-tiny   # the imagenet-linear task's cached features

--real MODEL uses the mean-pooled features of every layer of MODEL on the data world's ImageNet
(exactly what `totobench run --tasks imagenet-linear` reads: a cache hit after that run) instead
of synthetic ones, and also prints, per layer, the grid's val top-1 against scikit-learn's.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from totobench.probes.grid import holdout_split
from totobench.probes.linear import fit_linear_grid


def synthetic_layers(num_layers: int, n: int, dim: int, num_classes: int, seed: int = 0):
    """Features like a transformer's: low-rank class signal under correlated power-law noise.

    Layer quality rises then falls with depth (signal strength peaks mid-network).
    Returns train {layer: [n, dim]}, train labels, val {layer: [n // 2, dim]}, val labels.
    """
    rng = np.random.default_rng(seed)
    y_train, y_val = rng.integers(0, num_classes, n), rng.integers(0, num_classes, n // 2)
    spectrum = np.sqrt(np.arange(1, dim + 1) ** -0.75) * 4
    train, val = {}, {}
    for layer in range(num_layers):
        strength = 0.04 + 0.08 * np.sin(np.pi * (layer + 0.5) / num_layers)
        centers = rng.normal(size=(num_classes, 32)) @ (rng.normal(size=(32, dim)) / np.sqrt(32))
        basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
        offset = rng.normal(size=dim) * 3
        draw = lambda y: strength * centers[y] + (rng.normal(size=(len(y), dim)) * spectrum) @ basis.T + offset
        train[layer] = torch.from_numpy(draw(y_train).astype(np.float32))
        val[layer] = torch.from_numpy(draw(y_val).astype(np.float32))
    return train, torch.from_numpy(y_train), val, torch.from_numpy(y_val)


def sklearn_per_layer(train, y_train, val, y_val, cs, holdout=0.1, seed=0):
    """One LogisticRegression per (layer, C) on the fitting part; best C on the holdout; its val top-1."""
    fit_idx, hold_idx = (i.numpy() for i in holdout_split(y_train, holdout, seed))
    y = y_train.numpy()
    out = {}
    for layer, feats in train.items():
        x = feats.numpy()
        mean, std = x[fit_idx].mean(0), x[fit_idx].std(0) + 1e-6
        best = (-1.0, None, None)
        for c in cs:
            model = LogisticRegression(C=c, max_iter=1000).fit((x[fit_idx] - mean) / std, y[fit_idx])
            score = (model.predict((x[hold_idx] - mean) / std) == y[hold_idx]).mean()
            if score > best[0]:
                best = (score, c, model)
        out[layer] = {"C": best[1], "top1": float((best[2].predict((val[layer].numpy() - mean) / std)
                                                     == y_val.numpy()).mean())}
    return out


def real_layers(model: str):
    """The imagenet-linear task's cached features of every layer of `model` on the data world."""
    from types import SimpleNamespace

    from totobench.features.cache import FeatureCache
    from totobench.features.extract import extract_features
    from totobench.model import load_backbone
    from totobench.paths import cache_home
    from totobench.registry import TASKS
    from totobench.runner import resolve_data_root
    from totobench.tasks.config import load_task_config

    cfg = load_task_config("imagenet-linear")
    backbone = load_backbone(model)
    ctx = SimpleNamespace(data_root=resolve_data_root(cfg, None), backbone=backbone, quick=False, batch_size=64)
    task = TASKS.get(cfg.kind)(cfg)
    layers = list(range(backbone.num_layers))
    out = []
    for split in task.splits(ctx, task.resolve_input(backbone)):   # the task's own train and val
        feats = extract_features(backbone, split.dataset, layers, kind="image", pooling="mean",
                                 cache=FeatureCache(cache_home()), key_parts=split.key, batch_size=64)
        out += [{layer: torch.from_numpy(np.asarray(feats.feats[layer], dtype=np.float32)) for layer in layers},
                torch.from_numpy(np.asarray(feats.labels))]
    return (*out, split.info["num_classes"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="default: the imagenet-linear task's")
    parser.add_argument("--whiten", default=None, help="eigenvalue shrinkage, or 'none' (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both sides")
    parser.add_argument("--real", metavar="MODEL", help="use MODEL's cached imagenet-linear features of every layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from totobench.tasks.config import load_task_config
    task_probe = load_task_config("imagenet-linear").probe
    args.epochs = args.epochs or task_probe.epochs
    whiten = task_probe.whiten if args.whiten is None else (None if args.whiten == "none" else float(args.whiten))
    lrs, wds = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-4, 1e-2)
    cs = np.logspace(-2, 1, len(lrs) * len(wds))  # spans C = 1 / (wd * N) of the wd grid
    if args.real:
        train, y_train, val, y_val, args.classes = real_layers(args.real)
        args.layers, (args.n, args.dim) = len(train), train[0].shape
        print(f"{args.real} on the data world's ImageNet (imagenet-linear's cached mean-pooled features):")
    else:
        train, y_train, val, y_val = synthetic_layers(args.layers, args.n, args.dim, args.classes)
    print(f"{args.layers} layers x {args.n} x {args.dim} features, {args.classes} classes, {args.threads} thread(s)")

    start = time.perf_counter()
    grid = fit_linear_grid(train, y_train, val, y_val, args.classes, lrs=lrs, wds=wds, epochs=args.epochs,
                           batch_size=args.batch_size, refit=False, whiten=whiten)
    grid_s = time.perf_counter() - start
    with threadpool_limits(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        sk = sklearn_per_layer(train, y_train, val, y_val, cs)
        sk_s = time.perf_counter() - start

    print(f"{'layer':>5} {'grid top1':>9} {'lr':>7} {'wd':>6} {'sklearn top1':>12} {'C':>8}")
    for layer in train:
        g, s = grid[layer], sk[layer]
        print(f"{layer:>5} {g['metrics']['top1']:9.3f} {g['best_hparams']['lr']:7.0e} {g['best_hparams']['wd']:6.0e} "
              f"{s['top1']:12.3f} {s['C']:8.1e}")
    best_grid = max(r["metrics"]["top1"] for r in grid.values())
    best_sk = max(r["top1"] for r in sk.values())
    heads = args.layers * len(lrs) * len(wds)
    print(f"grid: {heads} heads ({args.layers} layers x {len(lrs)} lrs x {len(wds)} wds), {args.epochs} epochs, "
          f"{'standardised' if whiten is None else f'decorrelated (shrinkage {whiten})'} features: "
          f"{grid_s:.2f} s, best-layer top-1 {best_grid:.3f}")
    print(f"sklearn: {heads} LogisticRegression fits ({args.layers} layers x {len(cs)} C) in sequence: "
          f"{sk_s:.2f} s, best-layer top-1 {best_sk:.3f}")
    print(f"speed-up: {sk_s / grid_s:.1f}x")
    print(f"best-layer top-1: grid {best_grid:.3f} vs sklearn {best_sk:.3f} (difference {100 * (best_grid - best_sk):+.1f} points)")


if __name__ == "__main__":
    main()
