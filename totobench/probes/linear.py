"""Linear probe grid: one linear head per (layer, learning rate, weight decay), trained together.

The dinov2 `AllClassifiers` idea: every head sees the same batches, so the whole grid costs one
pass over the features per epoch, read from the cache or, streamed (`fit_streamed`,
features.stream.StreamedRows), through the backbone at every read: then a run costs one forward of
the fitted rows per epoch, plus the statistics passes (one, two with whiten), the held-out slice,
the refit's passes and val, and gives the cached run's numbers (same batches, float16 rows). The heads of a layer share its features,
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
The heads are saved after every epoch (ctx.state_dir): a killed run resumes with the same numbers.
Rows split among torchrun ranks (features.stream.Rows.shared) train data-parallel: each rank reads
its share of every batch; the statistics, the gradients (_shared_step) and the counts are summed
over the ranks, val scores gathered, so every rank steps and reports as one process (to float
summation order: tests/test_probe_data_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn

from totobench import parallel
from totobench.errors import ConfigError
from totobench.io import atomic_path
from totobench.features.stream import ArrayRows, Rows, in_index_order
from totobench.metrics.classification import topk_accuracy, true_class_rank
from totobench.probes.base import (CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec,
                                   classification_results, held_state, rows_of, state_file)
from totobench.probes.grid import GridAdamW, cosine_lr_scale, holdout_split
from totobench.progress import progress_bar

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


def _rows(features, layers: list[int]) -> Rows:
    """features.stream.Rows of `layers`: as they are, or over a {layer: [N, D]} mapping."""
    return features if isinstance(features, Rows) else ArrayRows({layer: features[layer] for layer in layers})


def _stacked(rows: Rows, layers: list[int], index: torch.Tensor, device,
             chunk: int = CHUNK_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features [layers, b, D] fp32, rows [b]) over chunks of `chunk` rows of index."""
    for feats, read in rows.read(index, chunk, device):
        yield torch.stack([feats[layer] for layer in layers]), read


def _standardisation(features, layers: list[int], index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean and std [layers, D] over rows `index` (of a {layer: [N, D]} mapping or Rows),
    accumulated chunk by chunk (float64)."""
    rows = _rows(features, layers)
    total = torch.zeros(len(layers), rows.row_shape[-1], dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for x, read in _stacked(rows, layers, index, device):
        x = x.double()
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += len(read)
    if rows.shared:  # every rank's rows: the statistics of one process (float64 sums)
        total, total_sq, count = _summed(total, total_sq, count)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def _whitening(features, layers: list[int], index: torch.Tensor, device,
               shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A better-conditioned basis for the same problem, per layer, from the rows `index`.

    With z the standardised features and U L U^T the eigendecomposition of their covariance,
    returns mean [layers, D], transform [layers, D, D] = diag(1/std) U (L + s)^-1/2 (s = shrink *
    mean(L)) and penalty [layers, D] = 1 / (L + s). Inputs u = (x - mean) @ transform are
    decorrelated (variance L / (L + s), ~1 for the informative directions), and a head V on u is
    the head W = U (L + s)^-1/2 V on z, so |W|^2 = sum_i penalty_i |V_i|^2: the L2 objective on
    the standardised features is unchanged, only its parametrisation, in which Adam converges fast.
    """
    rows = _rows(features, layers)
    mean, std = _standardisation(rows, layers, index, device)
    dim = rows.row_shape[-1]
    gram = torch.zeros(len(layers), dim, dim, dtype=torch.float64, device=device)
    count = 0
    for x, read in _stacked(rows, layers, index, device):
        z = (x - mean[:, None, :]) / std[:, None, :]
        gram += (z.transpose(1, 2) @ z).double()  # fp32 products per chunk, fp64 sums
        count += len(read)
    if rows.shared:
        gram, count = _summed(gram, count)
    evals, evecs = torch.linalg.eigh(gram / count)
    evals = evals.clamp_min(0) + shrink * evals.clamp_min(0).mean(1, keepdim=True)
    evals = evals.clamp_min(1e-12)
    transform = evecs * evals.rsqrt()[:, None, :] / std.double()[:, :, None]
    return mean, transform.float(), evals.reciprocal().float()


def _summed(*parts):
    """Sums over the ranks (torchrun data parallel) of tensors and int counts, in one all-reduce
    per dtype; ints come back as ints."""
    tensors = [p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.long) for p in parts]
    out = parallel.all_reduce_sum(tensors)
    return tuple(o if isinstance(p, torch.Tensor) else int(o) for p, o in zip(parts, out))


def _normalisation(rows: Rows, layers: list[int], index: torch.Tensor, device, whiten: float | None):
    """(mean, std [layers, D], None) to standardise, or (mean, transform, penalty) with whiten=s (_whitening)."""
    if whiten is None:
        return (*_standardisation(rows, layers, index, device), None)
    return _whitening(rows, layers, index, device, whiten)


def _batches(features, layers: list[int], index: torch.Tensor, mean, std, batch_size: int, device):
    """Yield (normalised features [layers, B, D], rows [B]) over consecutive slices of index. Rows
    split among ranks yield this rank's share of every slice, empty ones included (_shared_batches)."""
    rows = _rows(features, layers)
    if rows.shared:
        yield from _shared_batches(rows, layers, index, mean, std, batch_size, device)
        return
    for x, read in _stacked(rows, layers, index, device):
        x = _normalised(x, mean, std)
        for b in range(0, len(read), batch_size):
            yield x[:, b:b + batch_size], read[b:b + batch_size]


def _normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """x [layers, b, D] minus mean, then scaled: std [layers, D] per feature (standardise) or a
    [layers, D, D] transform (whiten)."""
    x = x - mean[:, None, :]
    return torch.bmm(x, std) if std.dim() == 3 else x / std[:, None, :]


def _shared_batches(rows: Rows, layers: list[int], index: torch.Tensor, mean, std, batch_size: int, device):
    """_batches of rows split among ranks: chunks of whole batches are read (this rank's share of
    each), and the rows of the chunk's batch k (positions k * B .. k * B + B - 1 of the chunk) are
    yielded as batch k, so that the ranks' shares of a batch make up the one-process batch."""
    chunk = batch_size * max(1, CHUNK_ROWS // batch_size)
    for c, (x, read) in enumerate(_stacked(rows, layers, index, device, chunk)):
        piece = index[c * chunk:(c + 1) * chunk]
        x = _normalised(x, mean, std)
        ordered, order = piece.sort()
        batch_of = order[torch.searchsorted(ordered, read.contiguous())] // batch_size   # shares keep order
        bounds = torch.searchsorted(batch_of, torch.arange(-(-len(piece) // batch_size) + 1)).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield x[:, lo:hi], read[lo:hi]


@torch.no_grad()
def train_linear_heads(rows: Rows, layers: list[int], index: torch.Tensor, lr: torch.Tensor,
                       weight_decay: torch.Tensor, num_classes: int, mean, std, *, epochs: int, batch_size: int,
                       seed: int, device, penalty=None, on_epoch: Callable[[int], None] | None = None,
                       checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None) -> LinearHeads:
    """Train heads with hyper-parameters lr, weight_decay [layers, heads] on rows `index`, same batches for all.

    std: [layers, D] (standardise) or a [layers, D, D] transform with its per-input `penalty`
    [layers, D] (see _whitening): the L2 term of input i is weight_decay * penalty_i. Epoch e reads
    `rows.for_epoch(e)` in an order drawn from `seed`; stored rows that fit in memory are normalised
    once, streamed ones are read (through the backbone) every epoch. on_epoch(e) after each epoch;
    checkpoint(state) too, with the state ({"epoch", "heads", "optimizer", "rng"}) that `resume`
    continues from exactly (the epochs after state["epoch"])."""
    num_layers, num_heads = lr.shape
    heads = LinearHeads(num_layers, num_heads, rows.row_shape[-1], num_classes).to(device)
    per_column = lambda t: t[:, None, :, None].expand(-1, 1, -1, num_classes).reshape(num_layers, 1, -1).to(device)
    # weight decay enters the gradient as an L2 penalty, so the optimum is LogisticRegression's
    optimizer = GridAdamW([(heads.weight, per_column(lr), None), (heads.bias, per_column(lr), None)])
    l2 = per_column(weight_decay)
    if penalty is not None:
        l2 = l2 * penalty.to(device)[:, :, None]
    onehot = torch.eye(num_classes, device=device)[rows.labels.to(device).clamp_min(0)]
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * -(-len(index) // batch_size)
    # when every row fits in one chunk, normalise the rows once instead of once per epoch
    fits = (not rows.streamed and not rows.shared and len(index) <= CHUNK_ROWS
            and num_layers * len(index) * rows.row_shape[-1] * 4 <= RESIDENT_BYTES)
    resident = next(_batches(rows, layers, index, mean, std, len(index), device))[0] if fits else None
    start = 0
    if resume is not None:
        heads.load_state_dict(resume["heads"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["rng"])
        start = resume["epoch"] + 1
    for e in range(start, epochs):
        perm = torch.randperm(len(index), generator=generator)
        order = index[perm]
        if resident is not None:
            epoch = ((resident[:, perm[b:b + batch_size]], order[b:b + batch_size])
                     for b in range(0, len(index), batch_size))
        else:
            epoch = _batches(rows.for_epoch(e), layers, order, mean, std, batch_size, device)
        for x, read in epoch:
            if rows.shared:
                _shared_step(heads, optimizer, x, onehot[read.to(device)], l2, total_steps)
                continue
            if not len(read):
                continue  # a streamed batch whose items were all unreadable
            # softmax cross-entropy, gradient written out: d loss / d logits = (softmax - onehot) / B
            grad = heads(x).softmax(-1).sub_(onehot[read.to(device)][None, :, None, :]).div_(max(1, len(read)))
            grad = grad.view(num_layers, len(read), -1)
            heads.weight.grad = torch.bmm(x.transpose(1, 2), grad).addcmul_(l2, heads.weight)
            heads.bias.grad = grad.sum(1, keepdim=True)
            optimizer.step(cosine_lr_scale(optimizer.steps, total_steps))
        if checkpoint is not None:
            checkpoint({"epoch": e, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": generator.get_state()})
        if on_epoch is not None:
            on_epoch(e)
    return heads


def _shared_step(heads: LinearHeads, optimizer: GridAdamW, x: torch.Tensor, onehot: torch.Tensor, l2,
                 total_steps: int) -> None:
    """One step of train_linear_heads on this rank's share x [layers, b, D] (b may be 0) of a batch:
    the loss is the mean over the batch of every rank (its row count all-reduced), the data terms
    of the gradients are summed over the ranks (one all-reduce), the L2 term is added once; every
    rank then takes the same step. A batch no rank could read is skipped by all."""
    (count,) = _summed(len(x[0]))
    if not count:
        return
    grad = heads(x).softmax(-1).sub_(onehot[None, :, None, :]).div_(count)
    grad = grad.view(x.shape[0], x.shape[1], -1)
    weight, bias = parallel.all_reduce_sum([torch.bmm(x.transpose(1, 2), grad), grad.sum(1, keepdim=True)])
    heads.weight.grad, heads.bias.grad = weight.addcmul_(l2, heads.weight), bias
    optimizer.step(cosine_lr_scale(optimizer.steps, total_steps))


@torch.no_grad()
def predict(heads: LinearHeads, rows: Rows, layers: list[int], index: torch.Tensor, mean, std,
            batch_size: int = 1024, device="cpu"):
    """Yield (logits [layers, B, heads, C], rows) of every head over rows `index`, streamed."""
    for x, read in _batches(rows, layers, index, mean, std, batch_size, device):
        yield heads(x), read


def count_correct(heads: LinearHeads, rows: Rows, layers: list[int], index: torch.Tensor, mean, std,
                  ks=(1,), device="cpu") -> tuple[dict[int, torch.Tensor], int]:
    """({k: correct counts [layers, heads]} of every head on rows `index`, rows read)."""
    counts = {k: torch.zeros(len(layers), heads.num_heads, dtype=torch.long) for k in ks}
    seen = 0
    for logits, read in predict(heads, rows, layers, index, mean, std, device=device):
        if not len(read):
            continue
        rank = true_class_rank(logits, rows.labels[read][None, :, None].expand(logits.shape[:3]))  # [layers, B, heads]
        for k in ks:
            counts[k] += (rank < k).sum(1).cpu()
        seen += len(read)
    if rows.shared:  # every rank's rows
        *summed, seen = _summed(*[counts[k] for k in ks], seen)
        counts = dict(zip(ks, summed))
    return counts, seen


def fit_linear_grid(train: dict, train_labels: torch.Tensor, val: dict, val_labels: torch.Tensor,
                    num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, epochs: int = 10,
                    batch_size: int = 64, holdout: float = 0.1, refit: bool = True, seed: int = 0,
                    device="cpu", return_scores: bool = False, whiten: float | None = None) -> dict[int, dict]:
    """Linear probes for every layer x lr x wd; choose (lr, wd) per layer on a held-out slice of train.

    train: {layer: features [N, D]} (torch tensors or numpy arrays/memmaps, any float dtype; the
    same D for every layer), train_labels [N]; val: {layer: [M, D]} with the same layers, val_labels [M].
    See fit_linear_rows (which this calls on ArrayRows of both).
    """
    if set(val) != set(train):
        raise ValueError(f"train and val must hold the same layers, got {sorted(train)} and {sorted(val)}")
    return fit_linear_rows(ArrayRows(train, train_labels), ArrayRows(val, val_labels), num_classes, lrs, wds,
                           epochs, batch_size, holdout, refit, seed, device, return_scores, whiten)


def fit_linear_rows(train: Rows, val: Rows, num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, epochs: int = 10,
                    batch_size: int = 64, holdout: float = 0.1, refit: bool = True, seed: int = 0, device="cpu",
                    return_scores: bool = False, whiten: float | None = None,
                    on_epoch: Callable[[str, int], None] | None = None, state_path: str | Path | None = None,
                    save_state: bool = True) -> dict[int, dict]:
    """The linear grid on rows read in batches (features.stream.Rows: stored or streamed).

    wds are L2 penalties (mean loss + wd/2 |W|^2, i.e. LogisticRegression's C = 1 / (wd * N)).
    Returns {layer: {"metrics": {"top1", "top5"} on val (fractions), "best_hparams": {"lr", "wd"},
    "select_score": top-1 of the chosen head on the held-out slice}}. refit=True retrains the
    chosen head on all of train before reporting; False reports the head fitted without the slice.
    return_scores=True adds "val_scores": logits [M, C] (fp32, CPU) of the reported head.
    whiten=None trains on the standardised features; a number s >= 0 in their decorrelated
    eigenbasis, eigenvalues shrunk by s x their mean (see _whitening; the objective is the same).
    on_epoch(stage, epoch) after each epoch of stage "grid" and "refit" (progress display).
    state_path: the heads are saved there (atomically) after every epoch and a run resumes from it,
    with the same numbers (save_state=False only reads it: torchrun ranks > 0).
    Streamed rows are read once for the statistics (twice with whiten), once per epoch, once for
    the held-out slice, again for the refit, and once for val.
    Deterministic given seed. Raises ConfigError on an empty grid or bad settings.
    """
    _check_grid(lrs, wds, epochs, batch_size, whiten)
    layers = train.layers
    hparams = [(float(lr), float(wd)) for lr in lrs for wd in wds]
    grid_lr = torch.tensor([lr for lr, _ in hparams]).expand(len(layers), -1)
    grid_wd = torch.tensor([wd for _, wd in hparams]).expand(len(layers), -1)
    common = dict(epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    stage = (lambda name: (lambda e: on_epoch(name, e))) if on_epoch is not None else (lambda name: None)

    saved = torch.load(state_path, weights_only=False) if state_path and Path(state_path).exists() else None

    def saver(name: str, **chosen):
        if state_path is None or not save_state:
            return None
        def save(state: dict) -> None:
            with atomic_path(state_path) as tmp:
                torch.save({"stage": name, **chosen, **state}, tmp)
        return save

    fit_idx, holdout_idx = holdout_split(train.labels, holdout, seed)
    if saved is not None and saved["stage"] == "refit":  # the grid and its selection were done before the kill
        select, best = saved["select"], saved["best"]
    else:
        mean, std, common["penalty"] = _normalisation(train, layers, fit_idx, device, whiten)
        heads = train_linear_heads(train, layers, fit_idx, grid_lr, grid_wd, num_classes, mean, std,
                                   on_epoch=stage("grid"), checkpoint=saver("grid"), resume=saved, **common)
        counts, seen = count_correct(heads, train, layers, holdout_idx, mean, std, device=device)
        select = counts[1] / max(1, seen)
        best = select.argmax(1)  # first maximum: ties go to the earlier (lr, wd) of the grid
        saved = None

    if refit:
        all_idx = torch.arange(len(train))
        mean, std, common["penalty"] = _normalisation(train, layers, all_idx, device, whiten)
        heads = train_linear_heads(train, layers, all_idx, grid_lr.gather(1, best[:, None]),
                                   grid_wd.gather(1, best[:, None]), num_classes, mean, std,
                                   on_epoch=stage("refit"), checkpoint=saver("refit", select=select, best=best),
                                   resume=saved, **common)
    else:
        heads = heads.select(best)
    out = {layer: {"best_hparams": {"lr": hparams[best[li]][0], "wd": hparams[best[li]][1]},
                   "select_score": select[li, best[li]].item()} for li, layer in enumerate(layers)}
    _score_val(out, heads, val, layers, mean, std, device, return_scores)
    return out


def _check_grid(lrs, wds, epochs: int, batch_size: int, whiten) -> None:
    """One-line ConfigErrors for an empty grid or bad settings of the linear grid."""
    if not lrs or not wds:
        raise ConfigError(f"probe.lrs and probe.wds must be non-empty lists, got {list(lrs)} and {list(wds)}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"probe.epochs and probe.batch_size must be >= 1, got {epochs} and {batch_size}")
    if whiten is not None and (isinstance(whiten, bool) or not isinstance(whiten, (int, float)) or whiten < 0):
        raise ConfigError(f"probe.whiten must be null or a number >= 0 (eigenvalue shrinkage), got {whiten!r}")


def _score_val(out: dict[int, dict], heads, val: Rows, layers: list[int], mean, std, device,
               return_scores: bool) -> None:
    """Add each layer's val "metrics" (top-1/top-5 of the reported head) to `out`, and its
    "val_scores" [M, C] when return_scores."""
    val_index = torch.arange(len(val))
    if return_scores:
        parts = [(logits[:, :, 0].cpu(), read) for logits, read in predict(heads, val, layers, val_index, mean, std,
                                                                            device=device)]
        scores, read = torch.cat([p for p, _ in parts], dim=1), torch.cat([r for _, r in parts])
        if val.shared:  # every rank's scores, in the one-process order
            read, scores = in_index_order(val_index, read, scores, dim=1)
        labels = val.labels[read]
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = topk_accuracy(scores[li], labels, (1, 5))
            out[layer]["val_scores"] = scores[li]
    else:
        counts, seen = count_correct(heads, val, layers, val_index, mean, std, ks=(1, 5), device=device)
        for li, layer in enumerate(layers):
            out[layer]["metrics"] = {f"top{k}": counts[k][li, 0].item() / max(1, seen) for k in (1, 5)}


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
    augment: bool = False      # train on the task's augmented views (task.augmented), streamed every epoch
    searched: ClassVar[tuple[str, ...]] = ("lrs", "wds")


class LinearProbe(Probe):
    Spec = LinearSpec
    produces = CLASS_SCORES

    def deviations(self, spec: LinearSpec) -> list[str]:
        return [f"linear probe on {spec.pooling}-pooled tokens: the paper's average-pooling ablation "
                f"(53.2 vs 61.1 top-1 for its attention pooling), not its protocol"]

    def fit(self, train: ProbeData, val: ProbeData, spec: LinearSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        return self.fit_streamed(train, val, spec, ctx)

    def fit_streamed(self, train: ProbeData, val: ProbeData, spec: LinearSpec,
                     ctx: ProbeContext) -> dict[int, LayerResult]:
        """`fit` on rows read batch by batch (`train.rows`, `val.rows`; stored features when None): one
        code path, so stored and streamed features of the same batches give the same numbers. An
        epoch/progress line per stage (grid, then refit)."""
        train_rows, val_rows = rows_of(train), rows_of(val)
        console = ctx.console if ctx.primary else None
        stages = ("grid", "refit") if spec.refit else ("grid",)
        what = "streamed probe epochs" if train_rows.streamed else "probe epochs"
        with held_state(state_file("linear_state", train, spec, ctx), ctx) as state_path, \
                progress_bar(console, fields="", disable=console is None) as shown:
            jobs = {stage: shown.add_task(f"{ctx.desc or 'linear'} {what} ({stage})", total=spec.epochs)
                    for stage in stages}
            out = fit_linear_rows(train_rows, val_rows, train.num_classes, lrs=spec.lrs, wds=spec.wds,
                                  epochs=spec.epochs, batch_size=spec.batch_size, holdout=spec.holdout,
                                  refit=spec.refit, seed=ctx.seed, device=ctx.device,
                                  return_scores=ctx.keep_outputs, whiten=spec.whiten, state_path=state_path,
                                  save_state=ctx.primary,
                                  on_epoch=lambda stage, epoch: shown.update(jobs[stage], completed=epoch + 1))
        return classification_results(out)
