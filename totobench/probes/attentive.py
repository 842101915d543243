"""Attentive probe (the paper's probe): a learnable query cross-attends over one layer's tokens.

The heads (`probe.head`: "aim", the default, "vjepa", "mha") live in probes/attentive_heads.py.
`AttentiveProbeGrid` trains probes for several layers x lrs x wds from streamed batches (one
backbone pass yields every layer's tokens), selects on a held-out slice, and can be resumed;
`fit_attentive_rows` feeds it from features.stream.Rows (cached features, or features the backbone
computes at every read: the same batches either way), `fit_attentive_grid` from feature arrays;
`AttentiveProbe` is the registered probe (`fit` and `fit_streamed` are one code path). Rows split
among torchrun ranks train data-parallel (AttentiveProbeGrid's data_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench import parallel
from totobench.errors import CheckpointError, ConfigError
from totobench.features.stream import ArrayRows, Rows, in_index_order
from totobench.io import atomic_path
from totobench.metrics.classification import topk_correct, true_class_rank
from totobench.probes.base import (CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec,
                                   classification_results, held_state, rows_of, state_file)
# the heads, also importable from here (tests and users name them with the probe)
from totobench.probes.attentive_heads import (HEADS, AimProbes, AttentiveHead, AttentiveProbes,  # noqa: F401
                                              Head, VJepaProbes, make_probes, spacetime_sincos)
from totobench.probes.grid import GridAdamW, cosine_lr_scale, holdout_split
from totobench.progress import progress_bar

DEFAULT_LRS = (1e-3, 3e-4)
DEFAULT_WDS = (1e-4, 1e-2)

Batches = Callable[[], Iterable[tuple[dict[int, torch.Tensor], torch.Tensor]]]
EpochBatches = Callable[[int], Iterable[tuple[dict[int, torch.Tensor], torch.Tensor]]]


class AttentiveProbeGrid:
    """Attentive probes for every (layer, lr, wd), trained together from streamed token batches.

    Per step, `train_step({layer: tokens [B, L, D]}, labels [B])` updates every probe (AdamW, its
    own lr and decoupled wd; warmup then cosine to 0 when total_steps is known, else constant).
    `head` picks the probe ("mha", "aim", "vjepa": see HEADS); probes run in train mode for steps
    and in eval mode for scoring (the AIM head's BatchNorm).
    Selection: stream held-out batches through `evaluate`, then `select()` picks the best (lr, wd)
    per layer by top-1. `state_dict()` / `load_state_dict()` resume training exactly.
    data_parallel=True (torchrun): each rank passes its share of every batch (possibly empty) to
    `train_step` and `evaluate`; a step's loss is the mean over the whole batch of all ranks, the
    gradients are all-reduced (AIM's BatchNorm statistics too, AimProbes.sync_statistics), so all
    ranks take the one step one process takes on the whole batch; `select()` counts every rank's rows.
    """

    def __init__(self, layers: list[int], dim: int, num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS,
                 num_heads: int = 8, total_steps: int | None = None, warmup_steps: int = 0, seed: int = 0,
                 device="cpu", positions: tuple[int, int, int] | None = None, head: str = "mha",
                 data_parallel: bool = False):
        if not lrs or not wds:
            raise ConfigError(f"probe.lrs and probe.wds must be non-empty lists, got {list(lrs)} and {list(wds)}")
        self.layers = list(layers)
        self.hparams = [(float(lr), float(wd)) for lr in lrs for wd in wds]
        self.config = {"layers": self.layers, "dim": dim, "num_classes": num_classes, "hparams": self.hparams,
                       "num_heads": num_heads, "total_steps": total_steps, "warmup_steps": warmup_steps, "seed": seed,
                       "positions": list(positions) if positions else None, "head": head}
        self.num_classes, self.device = num_classes, device
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        generator = torch.Generator().manual_seed(seed)
        self.num_heads = num_heads
        self.probes = nn.ModuleDict({str(layer): make_probes(head, len(self.hparams), dim, num_classes, num_heads,
                                                             generator, positions)
                                     for layer in self.layers}).to(device)
        self.data_parallel = data_parallel
        for probe in self.probes.values():
            if isinstance(probe, AimProbes):
                probe.sync_statistics = data_parallel
        lr = torch.tensor([lr for lr, _ in self.hparams])
        wd = torch.tensor([wd for _, wd in self.hparams])
        params = []
        for probe in self.probes.values():
            for name, p in probe.named_parameters():
                per_probe = (-1,) + (1,) * (p.ndim - 1)  # probe i's slice gets lr[i] and wd[i]
                params.append((p, lr.view(per_probe), wd.view(per_probe) if name in probe.decayed() else None))
        self.optimizer = GridAdamW(params)
        self.reset_evaluation()
        self.chosen: dict[int, int] | None = None

    @property
    def step(self) -> int:
        return self.optimizer.steps

    def _tokens(self, tokens: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        return tokens[layer].to(self.device, torch.float32)

    def train_step(self, tokens: dict[int, torch.Tensor], labels: torch.Tensor) -> float:
        """One AdamW step of every probe on a batch; returns the loss averaged over probes (with
        data_parallel, over the whole batch of all ranks: 0.0 and no step when it has no row)."""
        labels = labels.to(self.device, torch.long)
        n = len(self.hparams)
        count = len(labels)
        if self.data_parallel:
            count = int(parallel.all_reduce_sum([torch.tensor(count)])[0])
            if not count:
                return 0.0
        self.probes.train()
        loss = 0.0
        for layer in self.layers:
            logits = self.probes[str(layer)](self._tokens(tokens, layer))
            # sum over probes of each probe's batch-mean loss: every probe gets its own gradient
            loss = loss + F.cross_entropy(logits.reshape(-1, self.num_classes), labels.repeat(n),
                                          reduction="sum") / count
        self.optimizer.zero_grad()
        loss.backward()
        if self.data_parallel:
            loss = self._all_reduce_gradients(loss)
        self.optimizer.step(cosine_lr_scale(self.optimizer.steps, self.total_steps, self.warmup_steps))
        return loss.item() / (n * len(self.layers))

    def _all_reduce_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """Sum every probe parameter's gradient over the ranks (one flat all-reduce, the loss in
        it too); returns the summed loss."""
        params = self.optimizer.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        *summed, loss = parallel.all_reduce_sum([*grads, loss.detach().reshape(1)])
        for p, g in zip(params, summed):
            p.grad = g
        return loss[0]

    @torch.no_grad()
    def scores(self, tokens: dict[int, torch.Tensor]) -> dict[tuple[int, float, float], torch.Tensor]:
        """Logits [B, C] of every probe, keyed (layer, lr, wd)."""
        self.probes.eval()
        out = {}
        for layer in self.layers:
            logits = self.probes[str(layer)](self._tokens(tokens, layer))
            out.update({(layer, lr, wd): logits[i] for i, (lr, wd) in enumerate(self.hparams)})
        return out

    def reset_evaluation(self):
        """Forget the held-out counts gathered by `evaluate`."""
        self.holdout_correct = torch.zeros(len(self.layers), len(self.hparams), dtype=torch.long)
        self.holdout_seen = 0

    @torch.no_grad()
    def evaluate(self, tokens: dict[int, torch.Tensor], labels: torch.Tensor):
        """Add a held-out batch to every probe's top-1 count."""
        self.probes.eval()
        for li, layer in enumerate(self.layers):
            logits = self.probes[str(layer)](self._tokens(tokens, layer))  # [probes, B, C]
            rank = true_class_rank(logits, labels[None].expand(logits.shape[:2]))
            self.holdout_correct[li] += (rank == 0).sum(1).cpu()
        self.holdout_seen += len(labels)

    def select(self) -> dict[int, dict]:
        """Best (lr, wd) per layer by held-out top-1 (ties: earlier in the grid).

        Returns {layer: {"best_hparams": {"lr", "wd", "num_heads"}, "select_score"}} (num_heads: the
        attention heads the probes ran with); raises ValueError when no held-out batch was evaluated.
        """
        correct, seen = self.holdout_correct, self.holdout_seen
        if self.data_parallel:  # every rank's held-out rows
            correct, seen = parallel.all_reduce_sum([correct, torch.tensor(seen)])
            seen = int(seen)
        if seen == 0:
            raise ValueError("select() needs held-out batches: call evaluate() first")
        accuracy = correct / seen
        best = accuracy.argmax(1)
        self.chosen = {layer: int(best[li]) for li, layer in enumerate(self.layers)}
        return {layer: {"best_hparams": {"lr": self.hparams[i][0], "wd": self.hparams[i][1],
                                         "num_heads": self.num_heads},
                        "select_score": accuracy[li, i].item()}
                for li, (layer, i) in enumerate(self.chosen.items())}

    @torch.no_grad()
    def selected_scores(self, tokens: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Logits [B, C] of each layer's chosen probe (call `select()` first)."""
        if self.chosen is None:
            raise ValueError("selected_scores() needs select() first")
        self.probes.eval()
        return {layer: self.probes[str(layer)](self._tokens(tokens, layer))[i] for layer, i in self.chosen.items()}

    def state_dict(self) -> dict:
        return {"config": self.config, "probes": self.probes.state_dict(), "optimizer": self.optimizer.state_dict(),
                "holdout_correct": self.holdout_correct.clone(), "holdout_seen": self.holdout_seen,
                "chosen": self.chosen}

    def load_state_dict(self, state: dict):
        """Restore a state saved by `state_dict()`; raises CheckpointError when the grid differs."""
        if state.get("config") != self.config:
            raise CheckpointError(f"attentive probe state was saved for {state.get('config')}, "
                                  f"this grid is {self.config}")
        self.probes.load_state_dict(state["probes"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.holdout_correct = state["holdout_correct"].clone()
        self.holdout_seen = state["holdout_seen"]
        self.chosen = state["chosen"]


def fit_attentive_grid_streamed(train_batches: EpochBatches, holdout_batches: Batches, val_batches: Batches,
                                layers: list[int], dim: int, num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS,
                                epochs: int = 10, num_heads: int = 8, warmup_epochs: float = 0.0,
                                steps_per_epoch: int | None = None, seed: int = 0, device="cpu",
                                state_path: str | Path | None = None,
                                on_epoch: Callable[[int, float], None] | None = None,
                                return_scores: bool = False,
                                positions: tuple[int, int, int] | None = None, head: str = "mha",
                                save_state: bool = True, data_parallel: bool = False) -> dict[int, dict]:
    """Train an AttentiveProbeGrid for `epochs` over streamed batches, select, report on val.

    train_batches(epoch), holdout_batches() and val_batches() each return a fresh iterable of
    ({layer: tokens [B, L, D]}, labels [B]); the caller keeps the held-out items out of train
    and shuffles train by epoch (so a resumed run sees the same batches as an uninterrupted one). The cosine schedule needs the number of
    batches per epoch: steps_per_epoch, else len() of the first train iterable, else constant lr.
    state_path: the grid is saved there (atomically) after every epoch and a run resumes from it
    (one process per path: AttentiveProbe.fit holds a lock beside it); save_state=False only reads it
    (torchrun ranks > 0, which train in step with rank 0).
    on_epoch(epoch, mean_loss) is called after each epoch (progress display).
    Returns {layer: {"metrics": {"top1", "top5"} on val, "best_hparams": {"lr", "wd", "num_heads"},
    "select_score": held-out top-1}} (the probes are trained without the held-out slice; no refit).
    return_scores=True adds "val_scores": logits [M, C] (fp32, CPU) of the chosen probe.
    positions=(T, H, W): space-time position embeddings in the probes (see AttentiveProbes; head
    "mha" only). head: "mha" (AttentiveProbes), "aim" (AimProbes) or "vjepa" (VJepaProbes).
    data_parallel=True (torchrun): every batch is this rank's share (train ones possibly empty, and
    every rank yields as many); the grid steps data-parallel (AttentiveProbeGrid), selection and
    the val metrics count every rank's rows, "val_scores" are this rank's rows only.
    """
    if epochs < 1:
        raise ConfigError(f"probe.epochs must be >= 1, got {epochs}")
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(train_batches(0))
        except TypeError:
            steps_per_epoch = None
    total = epochs * steps_per_epoch if steps_per_epoch else None
    warmup = int(warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
    grid = AttentiveProbeGrid(layers, dim, num_classes, lrs, wds, num_heads, total, warmup, seed, device, positions,
                              head, data_parallel)
    start_epoch = 0
    if state_path is not None and Path(state_path).exists():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        grid.load_state_dict(saved["grid"])
        start_epoch = saved["epoch"] + 1
    for epoch in range(start_epoch, epochs):
        losses = [grid.train_step(tokens, labels) for tokens, labels in train_batches(epoch)]
        if state_path is not None and save_state:
            with atomic_path(state_path) as tmp:
                torch.save({"grid": grid.state_dict(), "epoch": epoch}, tmp)
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(1, len(losses)))

    grid.reset_evaluation()
    for tokens, labels in holdout_batches():
        grid.evaluate(tokens, labels)
    selection = grid.select()
    correct = torch.zeros(len(layers), 2, dtype=torch.long)   # top-1, top-5 per layer
    scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    seen = 0
    for tokens, labels in val_batches():
        for li, (layer, logits) in enumerate(grid.selected_scores(tokens).items()):
            hits = topk_correct(logits, labels, (1, 5))
            correct[li] += torch.tensor([hits[1], hits[5]])
            if return_scores:
                scores[layer].append(logits.cpu())
        seen += len(labels)
    if data_parallel:  # every rank's val rows
        correct, seen = parallel.all_reduce_sum([correct, torch.tensor(seen)])
        seen = int(seen)
    out = {layer: {"metrics": {f"top{k}": int(correct[li, j]) / max(1, seen) for j, k in enumerate((1, 5))},
                   **selection[layer]} for li, layer in enumerate(layers)}
    if return_scores:
        for layer in layers:
            out[layer]["val_scores"] = torch.cat(scores[layer]) if scores[layer] else torch.zeros(0, num_classes)
    return out


def fit_attentive_grid(train: dict, train_labels, val: dict, val_labels, num_classes: int, lrs=DEFAULT_LRS,
                       wds=DEFAULT_WDS, epochs: int = 10, batch_size: int = 64, holdout: float = 0.1,
                       num_heads: int = 8, warmup_epochs: float = 0.0, seed: int = 0, device="cpu",
                       state_path: str | Path | None = None, return_scores: bool = False,
                       positions: tuple[int, int, int] | None = None, head: str = "mha",
                       on_epoch: Callable[[int, float], None] | None = None) -> dict[int, dict]:
    """The attentive grid on stored token features, with the linear grid's signature.

    train: {layer: tokens [N, L, D]} (tensors or numpy arrays/memmaps, any float dtype), val:
    {layer: [M, L, D]}; see fit_attentive_rows (which this calls on ArrayRows of both).
    """
    if set(val) != set(train):
        raise ValueError(f"train and val must hold the same layers, got {sorted(train)} and {sorted(val)}")
    return fit_attentive_rows(ArrayRows(train, train_labels), ArrayRows(val, val_labels), num_classes, lrs, wds,
                              epochs, batch_size, holdout, num_heads, warmup_epochs, seed, device, state_path,
                              return_scores=return_scores, positions=positions, head=head, on_epoch=on_epoch)


def fit_attentive_rows(train: Rows, val: Rows, num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, epochs: int = 10,
                       batch_size: int = 64, holdout: float = 0.1, num_heads: int = 8, warmup_epochs: float = 0.0,
                       seed: int = 0, device="cpu", state_path: str | Path | None = None, *,
                       save_state: bool = True, return_scores: bool = False,
                       positions: tuple[int, int, int] | None = None, head: str = "mha",
                       on_epoch: Callable[[int, float], None] | None = None) -> dict[int, dict]:
    """The attentive grid on rows read batch by batch (features.stream.Rows: stored or streamed).

    A stratified `holdout` slice of train selects (lr, wd); the rest is shuffled per epoch with
    (seed, epoch) and read in batches of batch_size from `train.for_epoch(epoch)` (the same batches
    whether the rows are stored or streamed). Pooled rows [b, D] are read as one token each.
    Rows split among ranks (torchrun; train and val alike) train data-parallel: each rank reads its
    share of every batch and the grid all-reduces (see AttentiveProbeGrid); "val_scores" are then
    every rank's, in the one-process order.
    Returns the per-layer dict of `fit_attentive_grid_streamed`.
    """
    if batch_size < 1:
        raise ConfigError(f"probe.batch_size must be >= 1, got {batch_size}")
    if train.shared != val.shared:
        raise ValueError("train and val rows must both be split among the ranks, or neither")
    layers = train.layers
    fit_idx, holdout_idx = holdout_split(train.labels, holdout, seed)
    val_index, val_read = torch.arange(len(val)), []

    def batches(rows: Rows, index, epoch=None, read_rows=None):
        if epoch is not None:  # shuffle by (seed, epoch): resuming replays the same order
            index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))]
        for feats, read in rows.read(index, batch_size):
            # a batch whose items were all unreadable has nothing to step on; a rank's empty share
            # of a train batch still steps with the others (data parallel)
            if len(read) or (epoch is not None and rows.shared):
                if read_rows is not None:
                    read_rows.append(read)
                yield as_tokens(feats), rows.labels[read]

    out = fit_attentive_grid_streamed(
        lambda epoch: batches(train.for_epoch(epoch), fit_idx, epoch), lambda: batches(train, holdout_idx),
        lambda: batches(val, val_index, read_rows=val_read), layers, train.row_shape[-1], num_classes,
        lrs, wds, epochs, num_heads, warmup_epochs, steps_per_epoch=-(-len(fit_idx) // batch_size), seed=seed,
        device=device, state_path=state_path, on_epoch=on_epoch, return_scores=return_scores, positions=positions,
        head=head, save_state=save_state, data_parallel=train.shared)
    if return_scores and val.shared:  # every rank's val scores, in the one-process order
        read = torch.cat(val_read) if val_read else torch.zeros(0, dtype=torch.long)
        _, scores = in_index_order(val_index, read, torch.stack([out[layer]["val_scores"] for layer in layers]), 1)
        for li, layer in enumerate(layers):
            out[layer]["val_scores"] = scores[li]
    return out


@dataclass(frozen=True)
class AttentiveSpec(ProbeSpec):
    """`probe:` settings of the attentive grid (see fit_attentive_grid)."""
    name: str = "attentive"
    pooling: str = "tokens"
    head: Head = "aim"         # aim: AIM's attention pooling (the paper's); vjepa: cross-attention + MLP; mha (HEADS)
    positions: Literal["none", "spacetime"] = "none"   # spacetime: a (frame, row, col) embedding in the probe (mha)
    lrs: tuple[float, ...] = field(default=DEFAULT_LRS, metadata={"gt": 0, "nonempty": True})
    wds: tuple[float, ...] = field(default=(1e-4,), metadata={"min": 0, "nonempty": True})
    epochs: int = field(default=10, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    holdout: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    num_heads: int | None = field(default=None, metadata={"min": 1})   # null: the model's heads (8 without any)
    warmup_epochs: float = field(default=0.0, metadata={"min": 0})
    augment: bool = False      # train on the task's augmented views (task.augmented), streamed every epoch
    searched: ClassVar[tuple[str, ...]] = ("lrs", "wds")

    def check(self, where: str) -> None:
        super().check(where)
        if self.positions == "spacetime" and not self.pooling.startswith("tokens"):
            raise ConfigError(f"{where}.positions: 'spacetime' needs every token (pooling 'tokens' or "
                              f"'tokens_pool<k>'), got pooling {self.pooling!r}")
        if self.positions != "none" and self.head != "mha":
            raise ConfigError(f"{where}.positions: {self.positions!r} needs head 'mha' (a position embedding only "
                              f"exists in that head), got head {self.head!r}")


def resolve_num_heads(spec: AttentiveSpec, ctx: ProbeContext, dim: int) -> int:
    """The probe's attention heads: probe.num_heads, else the model's (ctx.model_heads), else 8;
    a one-line ConfigError when they do not divide the feature dim."""
    if spec.num_heads is not None:
        heads, source = spec.num_heads, "set in probe.num_heads"
    elif ctx.model_heads:
        heads, source = ctx.model_heads, "the model's heads, as probe.num_heads is null"
    else:
        heads, source = 8, "the default for a model without attention heads, as probe.num_heads is null"
    if dim % heads:
        model = getattr(ctx, "model_name", None) or ctx.run_key.split(":")[0] or "?"
        raise ConfigError(f"probe.num_heads: {heads} heads ({source}) do not divide the feature dim {dim} "
                          f"of model {model}; set probe.num_heads to a divisor of {dim}")
    return heads


def as_tokens(feats: dict[int, object]) -> dict[int, object]:
    """{layer: [N, L, D]} as they are; pooled features [N, D] (pooling "mean") as one token each, [N, 1, D]."""
    return {layer: f[:, None] if f.ndim == 2 else f for layer, f in feats.items()}


class AttentiveProbe(Probe):
    Spec = AttentiveSpec
    produces = CLASS_SCORES

    HEAD_DEVIATIONS = {
        "mha": "probe head mha (LayerNorm, query/key/value/output projections: totobench's own); the paper's "
               "numbers compare with AIM's head",
        "vjepa": "probe head vjepa (cross-attention + MLP): the paper's higher-capacity head of its appendix, "
                 "not its main protocol"}

    def deviations(self, spec: AttentiveSpec, streamed: bool = False) -> list[str]:
        """See Probe.deviations; streamed: whether the probe trained on features streamed through the
        backbone (tasks/streaming.py) rather than cached ones (either way without augmentation unless
        probe.augment)."""
        out = [self.HEAD_DEVIATIONS[spec.head]] if spec.head in self.HEAD_DEVIATIONS else []
        if spec.pooling != "tokens":
            out.append(f"tokens {spec.pooling}-pooled before the probe; the paper's probe reads every token")
        if spec.positions != "none":
            out.append(f"a learnable {spec.positions} position embedding inside the probe (our addition)")
        if not spec.augment:
            out.append(f"trained on {'streamed' if streamed else 'cached'} features, without the augmentation "
                       f"the reference probes train with")
        return out

    @staticmethod
    def state_file(train: ProbeData, spec: AttentiveSpec, ctx: ProbeContext) -> Path | None:
        """Where `fit` saves the grid after every epoch, so that a killed run resumes (None without
        ctx.state_dir; see probes.base.state_file). While a process trains, it holds the lock beside
        it (probes.base.held_state); a second process training the same probe meanwhile keeps no
        state, rather than share the file."""
        return state_file("attentive_state", train, spec, ctx)

    def fit(self, train: ProbeData, val: ProbeData, spec: AttentiveSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        """Train the grid; each layer's best_hparams holds the chosen lr and wd and the num_heads that ran."""
        return self.fit_streamed(train, val, spec, ctx)

    def fit_streamed(self, train: ProbeData, val: ProbeData, spec: AttentiveSpec,
                     ctx: ProbeContext) -> dict[int, LayerResult]:
        """`fit` on rows read batch by batch (`train.rows`, `val.rows`; stored features when None):
        one code path, so stored and streamed features of the same batches give the same numbers."""
        train_rows, val_rows = rows_of(train), rows_of(val)
        num_heads = resolve_num_heads(spec, ctx, train_rows.row_shape[-1])
        positions = None
        if spec.positions == "spacetime":
            if train.token_grid is None or len(train.token_grid) != 3:
                raise ConfigError(f"probe.positions 'spacetime' needs a (frames, rows, cols) token grid, "
                                  f"got {train.token_grid}")
            positions = tuple(train.token_grid)
        console = ctx.console if ctx.primary else None
        with held_state(self.state_file(train, spec, ctx), ctx) as state_path, \
                progress_bar(console, fields="loss {task.fields[loss]}", disable=console is None) as shown:
            what = "streamed probe epochs" if train_rows.streamed else "probe epochs"
            job = shown.add_task(f"{ctx.desc or 'attentive'} {what}", total=spec.epochs, loss="-")
            out = fit_attentive_rows(
                train_rows, val_rows, train.num_classes, lrs=spec.lrs, wds=spec.wds, epochs=spec.epochs,
                batch_size=spec.batch_size, holdout=spec.holdout, num_heads=num_heads,
                warmup_epochs=spec.warmup_epochs, seed=ctx.seed, device=ctx.device, state_path=state_path,
                save_state=ctx.primary, return_scores=ctx.keep_outputs, positions=positions, head=spec.head,
                on_epoch=lambda epoch, loss: shown.update(job, completed=epoch + 1, loss=f"{loss:.3f}"))
        return classification_results(out)
