"""Attentive probe (the paper's probe): a learnable query cross-attends over one layer's tokens.

    tokens [B, L, D] -> LayerNorm -> multi-head attention of one learned query -> Linear -> logits [B, C]

`AttentiveProbes` holds n independent probes with their weights stacked on a leading axis, so a
grid of (lr, wd) probes over the same layer runs as a few batched tensor ops. With a single query
the keys never need to exist: score_l = q_h . (W_k x_l)_h = x_l . (W_k,h^T q_h), and the values
are a projection of the attention-weighted mean of the tokens, so a probe costs O(L * D * heads)
per item instead of the O(L * D^2) of materialised keys and values. The result is exactly
standard multi-head attention (tests compare it with torch's scaled_dot_product_attention).

`positions=(T, H, W)` adds a learnable space-time position embedding to the (normalised) tokens,
laid out frame by frame in raster order, initialised with fixed sines and cosines of frame, row and
column (a third of the channels each). Toto's rotary embedding leaves no absolute position in its
features, so without it the probe sees a clip as an unordered set of tokens: it cannot tell where
or when something changed, which is what separates "moving left" from "moving right". (Probes of
encoders with additive position embeddings, such as V-JEPA's, get this from the features.)

`AttentiveProbeGrid` trains probes for several layers x lrs x wds from streamed batches (one
backbone pass yields every layer's tokens), selects on a held-out slice, and can be resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench.errors import CheckpointError, ConfigError
from totobench.io import atomic_path, lock_beside
from totobench.metrics.classification import topk_correct, true_class_rank
from totobench.probes.base import (CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec,
                                   classification_results, labels_tensor)
from totobench.probes.grid import GridAdamW, cosine_lr_scale, gather_rows, holdout_split

DEFAULT_LRS = (1e-3, 3e-4)
DEFAULT_WDS = (1e-4, 1e-2)

Batches = Callable[[], Iterable[tuple[dict[int, torch.Tensor], torch.Tensor]]]
EpochBatches = Callable[[int], Iterable[tuple[dict[int, torch.Tensor], torch.Tensor]]]


def spacetime_sincos(frames: int, height: int, width: int, dim: int) -> torch.Tensor:
    """[frames * height * width, dim]: sines and cosines of (frame, row, col), a third of the
    channels each (frame first), tokens in frame-then-raster order; values in [-1, 1]."""
    def axis(n: int, channels: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(channels // 2, dtype=torch.float32) / max(1, channels // 2))
        table = torch.zeros(n, channels)
        table[:, 0:2 * (channels // 2):2], table[:, 1:2 * (channels // 2):2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return table
    third = dim // 3
    t, r, c = axis(frames, third), axis(height, third), axis(width, dim - 2 * third)
    table = torch.cat([t[:, None, None].expand(frames, height, width, third),
                       r[None, :, None].expand(frames, height, width, third),
                       c[None, None, :].expand(frames, height, width, dim - 2 * third)], -1)
    return table.reshape(frames * height * width, dim)


class AttentiveProbes(nn.Module):
    """n independent attentive probes over the same tokens; forward(tokens [B, L, D]) -> logits [n, B, C]."""

    def __init__(self, n: int, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None,
                 positions: tuple[int, int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"probe.num_heads ({num_heads}) must divide the feature dim ({dim})")
        self.num_heads = num_heads
        self.positions = tuple(positions) if positions else None
        if self.positions:
            table = spacetime_sincos(*self.positions, dim)
            self.pos_embed = nn.Parameter(table[None].repeat(n, 1, 1))  # [n, T*H*W, D]

        def normal(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.norm_weight = nn.Parameter(torch.ones(n, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n, dim))
        self.query = normal(n, dim, std=1.0)
        # projections act as x @ W ([D_in, D_out]); variance-preserving init, like nn.Linear's scale
        self.q_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.q_bias = nn.Parameter(torch.zeros(n, dim))
        self.k_proj = normal(n, dim, dim, std=dim ** -0.5)  # no key bias: it shifts all scores of a head equally
        self.v_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.v_bias = nn.Parameter(torch.zeros(n, dim))
        self.out_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(n, dim))
        self.head_weight = normal(n, dim, num_classes, std=0.01)
        self.head_bias = nn.Parameter(torch.zeros(n, num_classes))

    def decayed(self) -> set[str]:
        """Names of the parameters that weight decay applies to (matrices, not biases/norms/query)."""
        return {"q_proj", "k_proj", "v_proj", "out_proj", "head_weight"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = self.query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        x = F.layer_norm(tokens, (dim,))  # each probe's affine is applied below, after pooling
        q = (self.query[:, None, :] @ self.q_proj)[:, 0] + self.q_bias  # [n, D]
        k_weight = self.k_proj.view(n, dim, heads, head_dim)
        # fold each head's query into its key weights; LayerNorm's scale folds in too, its shift only
        # adds the same constant to every score of a head (softmax ignores it)
        raw_dirs = torch.einsum("ndhe,nhe->ndh", k_weight, q.view(n, heads, head_dim)) / math.sqrt(head_dim)
        key_dirs = raw_dirs * self.norm_weight[:, :, None]
        scores = torch.einsum("bld,ndh->nbhl", x, key_dirs)
        if self.positions:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ConfigError(f"attentive probe: positions {self.positions} need {self.pos_embed.shape[1]} tokens "
                                  f"per item, got {x.shape[1]}")
            # the probe's tokens are LN(x) * w + b + pos: pos meets the key weights unscaled
            scores = scores + torch.einsum("nld,ndh->nhl", self.pos_embed, raw_dirs)[:, None]
        attn = scores.softmax(-1)
        pooled = torch.einsum("nbhl,bld->nbhd", attn, x)  # per-head attention-weighted mean of tokens
        pooled = pooled * self.norm_weight[:, None, None, :] + self.norm_bias[:, None, None, :]
        if self.positions:
            pooled = pooled + torch.einsum("nbhl,nld->nbhd", attn, self.pos_embed)
        v = torch.einsum("nbhd,ndhe->nbhe", pooled, self.v_proj.view(n, dim, heads, head_dim))
        v = v.reshape(n, -1, dim) + self.v_bias[:, None, :]
        out = v @ self.out_proj + self.out_bias[:, None, :]
        return out @ self.head_weight + self.head_bias[:, None, :]


class AttentiveHead(AttentiveProbes):
    """One attentive probe head: forward(tokens [B, L, D]) -> logits [B, num_classes]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None):
        super().__init__(1, dim, num_classes, num_heads, generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens)[0]


class AttentiveProbeGrid:
    """Attentive probes for every (layer, lr, wd), trained together from streamed token batches.

    Per step, `train_step({layer: tokens [B, L, D]}, labels [B])` updates every probe (AdamW, its
    own lr and decoupled wd; warmup then cosine to 0 when total_steps is known, else constant).
    Selection: stream held-out batches through `evaluate`, then `select()` picks the best (lr, wd)
    per layer by top-1. `state_dict()` / `load_state_dict()` resume training exactly.
    """

    def __init__(self, layers: list[int], dim: int, num_classes: int, lrs=DEFAULT_LRS, wds=DEFAULT_WDS,
                 num_heads: int = 8, total_steps: int | None = None, warmup_steps: int = 0, seed: int = 0,
                 device="cpu", positions: tuple[int, int, int] | None = None):
        if not lrs or not wds:
            raise ConfigError(f"probe.lrs and probe.wds must be non-empty lists, got {list(lrs)} and {list(wds)}")
        self.layers = list(layers)
        self.hparams = [(float(lr), float(wd)) for lr in lrs for wd in wds]
        self.config = {"layers": self.layers, "dim": dim, "num_classes": num_classes, "hparams": self.hparams,
                       "num_heads": num_heads, "total_steps": total_steps, "warmup_steps": warmup_steps, "seed": seed,
                       "positions": list(positions) if positions else None}
        self.num_classes, self.device = num_classes, device
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        generator = torch.Generator().manual_seed(seed)
        self.probes = nn.ModuleDict({str(layer): AttentiveProbes(len(self.hparams), dim, num_classes, num_heads, generator,
                                                                         positions)
                                     for layer in self.layers}).to(device)
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
        """One AdamW step of every probe on a batch; returns the loss averaged over probes."""
        labels = labels.to(self.device, torch.long)
        n = len(self.hparams)
        loss = 0.0
        for layer in self.layers:
            logits = self.probes[str(layer)](self._tokens(tokens, layer))
            # sum over probes of each probe's batch-mean loss: every probe gets its own gradient
            loss = loss + F.cross_entropy(logits.reshape(-1, self.num_classes), labels.repeat(n),
                                          reduction="sum") / len(labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step(cosine_lr_scale(self.optimizer.steps, self.total_steps, self.warmup_steps))
        return loss.item() / (n * len(self.layers))

    @torch.no_grad()
    def scores(self, tokens: dict[int, torch.Tensor]) -> dict[tuple[int, float, float], torch.Tensor]:
        """Logits [B, C] of every probe, keyed (layer, lr, wd)."""
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
        for li, layer in enumerate(self.layers):
            logits = self.probes[str(layer)](self._tokens(tokens, layer))  # [probes, B, C]
            rank = true_class_rank(logits, labels[None].expand(logits.shape[:2]))
            self.holdout_correct[li] += (rank == 0).sum(1).cpu()
        self.holdout_seen += len(labels)

    def select(self) -> dict[int, dict]:
        """Best (lr, wd) per layer by held-out top-1 (ties: earlier in the grid).

        Returns {layer: {"best_hparams": {"lr", "wd"}, "select_score"}}; raises ValueError when
        no held-out batch was evaluated.
        """
        if self.holdout_seen == 0:
            raise ValueError("select() needs held-out batches: call evaluate() first")
        accuracy = self.holdout_correct / self.holdout_seen
        best = accuracy.argmax(1)
        self.chosen = {layer: int(best[li]) for li, layer in enumerate(self.layers)}
        return {layer: {"best_hparams": {"lr": self.hparams[i][0], "wd": self.hparams[i][1]},
                        "select_score": accuracy[li, i].item()}
                for li, (layer, i) in enumerate(self.chosen.items())}

    @torch.no_grad()
    def selected_scores(self, tokens: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Logits [B, C] of each layer's chosen probe (call `select()` first)."""
        if self.chosen is None:
            raise ValueError("selected_scores() needs select() first")
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
                                positions: tuple[int, int, int] | None = None) -> dict[int, dict]:
    """Train an AttentiveProbeGrid for `epochs` over streamed batches, select, report on val.

    train_batches(epoch), holdout_batches() and val_batches() each return a fresh iterable of
    ({layer: tokens [B, L, D]}, labels [B]); the caller keeps the held-out items out of train
    and shuffles train by epoch (so a resumed run sees the same batches as an uninterrupted one). The cosine schedule needs the number of
    batches per epoch: steps_per_epoch, else len() of the first train iterable, else constant lr.
    state_path: the grid is saved there (atomically) after every epoch and a run resumes from it
    (one process per path: AttentiveProbe.fit holds a lock beside it).
    on_epoch(epoch, mean_loss) is called after each epoch (progress display).
    Returns {layer: {"metrics": {"top1", "top5"} on val, "best_hparams": {"lr", "wd"},
    "select_score": held-out top-1}} (the probes are trained without the held-out slice; no refit).
    return_scores=True adds "val_scores": logits [M, C] (fp32, CPU) of the chosen probe.
    positions=(T, H, W): space-time position embeddings in the probes (see AttentiveProbes).
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
    grid = AttentiveProbeGrid(layers, dim, num_classes, lrs, wds, num_heads, total, warmup, seed, device, positions)
    start_epoch = 0
    if state_path is not None and Path(state_path).exists():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        grid.load_state_dict(saved["grid"])
        start_epoch = saved["epoch"] + 1
    for epoch in range(start_epoch, epochs):
        losses = [grid.train_step(tokens, labels) for tokens, labels in train_batches(epoch)]
        if state_path is not None:
            with atomic_path(state_path) as tmp:
                torch.save({"grid": grid.state_dict(), "epoch": epoch}, tmp)
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(1, len(losses)))

    grid.reset_evaluation()
    for tokens, labels in holdout_batches():
        grid.evaluate(tokens, labels)
    selection = grid.select()
    correct = {layer: {1: 0, 5: 0} for layer in layers}
    scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    seen = 0
    for tokens, labels in val_batches():
        for layer, logits in grid.selected_scores(tokens).items():
            for k, n in topk_correct(logits, labels, (1, 5)).items():
                correct[layer][k] += n
            if return_scores:
                scores[layer].append(logits.cpu())
        seen += len(labels)
    out = {layer: {"metrics": {f"top{k}": correct[layer][k] / seen for k in (1, 5)}, **selection[layer]}
           for layer in layers}
    if return_scores:
        for layer in layers:
            out[layer]["val_scores"] = torch.cat(scores[layer])
    return out


def fit_attentive_grid(train: dict, train_labels, val: dict, val_labels, num_classes: int, lrs=DEFAULT_LRS,
                       wds=DEFAULT_WDS, epochs: int = 10, batch_size: int = 64, holdout: float = 0.1,
                       num_heads: int = 8, warmup_epochs: float = 0.0, seed: int = 0, device="cpu",
                       state_path: str | Path | None = None, return_scores: bool = False,
                       positions: tuple[int, int, int] | None = None) -> dict[int, dict]:
    """The attentive grid on stored token features, with the linear grid's signature.

    train: {layer: tokens [N, L, D]} (tensors or numpy arrays/memmaps, any float dtype), val:
    {layer: [M, L, D]}; a stratified `holdout` slice of train selects (lr, wd). Batches are read
    row by row from the arrays (never copied whole), shuffled per epoch with `seed`.
    Returns the per-layer dict of `fit_attentive_grid_streamed`.
    """
    if batch_size < 1:
        raise ConfigError(f"probe.batch_size must be >= 1, got {batch_size}")
    layers = list(train)
    if set(val) != set(layers):
        raise ValueError(f"train and val must hold the same layers, got {sorted(train)} and {sorted(val)}")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    val_labels = torch.as_tensor(val_labels).long().cpu()
    fit_idx, holdout_idx = holdout_split(train_labels, holdout, seed)

    def batches(features, labels, index, epoch=None):
        if epoch is not None:  # shuffle by (seed, epoch): resuming replays the same order
            index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))]
        for start in range(0, len(index), batch_size):
            rows = index[start:start + batch_size]
            yield {layer: gather_rows(features[layer], rows) for layer in layers}, labels[rows]

    return fit_attentive_grid_streamed(
        lambda epoch: batches(train, train_labels, fit_idx, epoch), lambda: batches(train, train_labels, holdout_idx),
        lambda: batches(val, val_labels, torch.arange(len(val_labels))), layers, train[layers[0]].shape[-1], num_classes,
        lrs, wds, epochs, num_heads, warmup_epochs, steps_per_epoch=-(-len(fit_idx) // batch_size), seed=seed,
        device=device, state_path=state_path, return_scores=return_scores, positions=positions)


@dataclass(frozen=True)
class AttentiveSpec(ProbeSpec):
    """`probe:` settings of the attentive grid (see fit_attentive_grid)."""
    name: str = "attentive"
    pooling: str = "tokens"
    positions: Literal["none", "spacetime"] = "none"   # spacetime: a (frame, row, col) embedding in the probe
    lrs: tuple[float, ...] = field(default=DEFAULT_LRS, metadata={"gt": 0, "nonempty": True})
    wds: tuple[float, ...] = field(default=(1e-4,), metadata={"min": 0, "nonempty": True})
    epochs: int = field(default=10, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    holdout: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    num_heads: int = field(default=8, metadata={"min": 1})
    warmup_epochs: float = field(default=0.0, metadata={"min": 0})
    searched: ClassVar[tuple[str, ...]] = ("lrs", "wds")

    def check(self, where: str) -> None:
        super().check(where)
        if self.positions == "spacetime" and not self.pooling.startswith("tokens"):
            raise ConfigError(f"{where}.positions: 'spacetime' needs every token (pooling 'tokens' or "
                              f"'tokens_pool<k>'), got pooling {self.pooling!r}")


class AttentiveProbe(Probe):
    Spec = AttentiveSpec
    produces = CLASS_SCORES

    @staticmethod
    def state_file(train: ProbeData, spec: AttentiveSpec, ctx: ProbeContext) -> Path | None:
        """Where `fit` saves the grid after every epoch, so that a killed run resumes (None without
        ctx.state_dir); keyed so that other settings never reuse it. While a process trains, it
        holds the lock beside it (`totobench.io.lock_beside`); a second process training the same
        probe meanwhile keeps no state, rather than share the file."""
        if ctx.state_dir is None:
            return None
        key = json.dumps([spec.as_dict(), ctx.run_key, train.layers, len(train.labels), ctx.seed], sort_keys=True)
        return Path(ctx.state_dir) / f"attentive_state_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"

    def fit(self, train: ProbeData, val: ProbeData, spec: AttentiveSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        positions = None
        if spec.positions == "spacetime":
            if train.token_grid is None or len(train.token_grid) != 3:
                raise ConfigError(f"probe.positions 'spacetime' needs a (frames, rows, cols) token grid, "
                                  f"got {train.token_grid}")
            positions = tuple(train.token_grid)
        state_path, state_lock = self.state_file(train, spec, ctx), None
        if state_path is not None:
            state_lock = lock_beside(state_path)
            if not state_lock.try_acquire():  # another live process trains this very probe: never share its state
                state_path, state_lock = None, None
        try:
            out = fit_attentive_grid(train.feats, labels_tensor(train), val.feats, labels_tensor(val),
                                     train.num_classes, lrs=spec.lrs, wds=spec.wds, epochs=spec.epochs,
                                     batch_size=spec.batch_size, holdout=spec.holdout, num_heads=spec.num_heads,
                                     warmup_epochs=spec.warmup_epochs, seed=ctx.seed, device=ctx.device,
                                     state_path=state_path, return_scores=ctx.keep_outputs, positions=positions)
            if state_path is not None:
                state_path.unlink(missing_ok=True)
        finally:
            if state_lock is not None:
                state_lock.release()
        return classification_results(out)
