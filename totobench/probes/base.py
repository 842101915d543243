"""The probe contract: a typed spec, one entry point, registered once in `totobench.registry.PROBES`.

    probe = PROBES.get(spec.name)()                       # e.g. LinearProbe
    results = probe.fit(train, val, spec, ctx)            # {layer: LayerResult}

A probe reads frozen features of every requested layer (`ProbeData.feats`: layer -> rows, numpy
memmaps or tensors) and the task's targets, trains what it trains (or nothing: kNN, label
propagation) and returns, per layer, what the task scores: `LayerResult.outputs` (class scores,
detections, soft masks or a policy: the kind is the probe's `produces`) and, where the probe
selects hyper-parameters itself, its metrics on val, the chosen setting and its selection score.

Probes that train in epochs over batches (linear, attentive) also have `fit_streamed(train, val,
spec, ctx)`: the same training, reading `ProbeData.rows` (`features.stream.Rows`: rows by index,
from the cache or computed by the backbone at every read) instead of whole feature arrays; it is
what a task calls when its train features do not fit the cache budget. The others raise ConfigError.

A task declares the kind of output it consumes; the task config is rejected before any work when
its probe produces another kind. Tasks never switch on probe names.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch

from totobench.errors import ConfigError
from totobench.features.stream import ArrayRows
from totobench.io import lock_beside
from totobench.settings import Settings

# What a probe gives the task to score (a task consumes exactly one kind).
CLASS_SCORES = "class scores"          # [M, C] logits or scores of the val rows
STA_OUTPUTS = "STA head outputs"       # per-cell objectness, boxes, noun, verb, time to contact
SOFT_MASKS = "soft masks"              # [T, K+1, h, w] label maps of a video
POLICY = "policy"                      # an object with act(features) -> actions


@dataclass(frozen=True)
class ProbeSpec(Settings):
    """Settings every probe has: its registered name and how tokens are pooled before it."""
    name: str = ""
    pooling: str = "mean"

    def check(self, where: str) -> None:
        valid = self.pooling in ("mean", "tokens", "last_frame") or (
            self.pooling.startswith("tokens_pool") and self.pooling[len("tokens_pool"):].isdigit()
            and int(self.pooling[len("tokens_pool"):]) >= 1)
        if not valid:
            raise ConfigError(f"{where}.pooling: expected mean, tokens, tokens_pool<k> or last_frame, "
                              f"got {self.pooling!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; `augment` only when on, so results made before it existed still answer."""
        out = super().as_dict()
        if out.get("augment") is False:
            del out["augment"]
        return out

    @property
    def grid(self) -> dict[str, list]:
        """The hyper-parameters searched (list-valued settings)."""
        return {k: v for k, v in self.as_dict().items() if isinstance(v, list) and k in self.searched}

    @property
    def settings(self) -> dict[str, Any]:
        """Every other setting."""
        grid = self.grid
        return {k: v for k, v in self.as_dict().items() if k not in grid and k != "name"}

    searched: ClassVar[tuple[str, ...]] = ()   # names of the fields that are grids


@dataclass
class ProbeData:
    """One split as a probe sees it: features of every layer and the task's targets."""
    feats: Mapping[int, Any]                      # layer -> rows [N, ...] (memmap, array or tensor)
    labels: np.ndarray | None = None              # [N] class ids (classification probes)
    num_classes: int | None = None
    targets: Any = None                           # task-specific targets (STA boxes, first masks, actions)
    token_grid: tuple[int, ...] | None = None     # (frames, rows, cols) of each row's tokens
    rows: Any = None                              # features.stream.Rows for fit_streamed (feats then unused)

    @property
    def layers(self) -> list[int]:
        return sorted(self.feats)


@dataclass
class ProbeContext:
    """What a probe may use besides the data: where to run, its seed, where to keep resume state."""
    device: torch.device
    seed: int = 0
    state_dir: Path | None = None     # per-epoch state of resumable probes; None: not resumable
    run_key: str = ""                 # identifies the features (model, layers, split sizes) for state files
    keep_outputs: bool = False        # classification probes: also return val scores
    model_heads: int | None = None    # attention heads of the model read (None: it has none, e.g. pixels)
    console: Any = None               # a rich Console for progress lines (None: silent)
    desc: str = ""                    # what the progress lines are about, e.g. the task name
    primary: bool = True              # False on torchrun ranks > 0: they train in step but write no state


@dataclass
class LayerResult:
    metrics: dict[str, float] = field(default_factory=dict)    # on val, where the probe scores itself
    best_hparams: dict[str, Any] = field(default_factory=dict)
    select_score: float | None = None
    outputs: Any = None                                         # what the task scores (see `produces`)
    facts: dict[str, Any] = field(default_factory=dict)         # side facts worth recording (e.g. train loss)


class Probe:
    """Base class. Subclasses set `Spec`, `produces` and implement `fit`."""
    Spec: ClassVar[type[ProbeSpec]] = ProbeSpec
    produces: ClassVar[str] = CLASS_SCORES
    selection: ClassVar[str] = "none (fixed hyper-parameters)"   # which split chooses hyper-parameters

    def fit(self, train: ProbeData | None, val: ProbeData, spec: ProbeSpec,
            ctx: ProbeContext) -> dict[int, LayerResult]:
        raise NotImplementedError

    def fit_streamed(self, train: ProbeData, val: ProbeData, spec: ProbeSpec,
                     ctx: ProbeContext) -> dict[int, LayerResult]:
        """`fit` reading `train.rows` and `val.rows` (features.stream.Rows) batch by batch; the same
        numbers as `fit` on the same features. ConfigError for a probe that cannot stream."""
        raise ConfigError(f"probe {spec.name} cannot stream its training features; raise --cache-budget")

    def selection_split(self, spec: ProbeSpec) -> str:
        holdout = getattr(spec, "holdout", None)
        return f"train-holdout-{int(holdout * 100)}pct" if holdout is not None else self.selection

    def deviations(self, spec: ProbeSpec) -> list[str]:
        """How this probe with `spec` departs from the Toto paper's protocol (or the reference code
        it follows), one short sentence each; [] when faithful. Recorded in every result."""
        return []


def classification_results(out: dict[int, dict]) -> dict[int, LayerResult]:
    """The {layer: {"metrics", "best_hparams", "select_score", "val_scores"}} dicts of the grid
    functions as LayerResults."""
    return {layer: LayerResult(metrics=r["metrics"], best_hparams=r.get("best_hparams", {}),
                               select_score=r.get("select_score"), outputs=r.get("val_scores"))
            for layer, r in sorted(out.items())}


def labels_tensor(data: ProbeData) -> torch.Tensor:
    return torch.from_numpy(np.array(data.labels))


def rows_of(data: ProbeData):
    """The split as features.stream.Rows: `data.rows`, else its stored features."""
    return data.rows if data.rows is not None else ArrayRows(data.feats, data.labels)


def state_file(prefix: str, train: ProbeData, spec: ProbeSpec, ctx: ProbeContext) -> Path | None:
    """Where a resumable probe saves its state after every epoch (None without ctx.state_dir): keyed by
    the spec, the features (ctx.run_key), the layers, the train size and the seed, so that other
    settings never reuse it."""
    if ctx.state_dir is None:
        return None
    key = json.dumps([spec.as_dict(), ctx.run_key, train.layers, len(train.labels), ctx.seed], sort_keys=True)
    return Path(ctx.state_dir) / f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


@contextmanager
def held_state(path: Path | None, ctx: ProbeContext) -> Iterator[Path | None]:
    """The state file while a probe trains: held under its lock (`totobench.io.lock_beside`) and
    removed once the fit returns. None when `path` is None or another live process holds the lock
    (that process trains the very same probe: never share its state). Ranks > 0 (ctx.primary False)
    get the path to read, without the lock; they never write it."""
    if path is None or not ctx.primary:
        yield path
        return
    lock = lock_beside(path)
    if not lock.try_acquire():
        yield None
        return
    try:
        yield path
        path.unlink(missing_ok=True)
    finally:
        lock.release()
