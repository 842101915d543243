"""What a task run will store and compute, known before any feature is extracted.

    est = task.estimate(ctx, inputs, spec)          # tasks/base.py: one SplitEstimate per split
    print(est.summary())                            # stored bytes, forward TFLOPs, cached or streamed
    streamed = decide_streaming(est, ctx.cache_budget, augment=spec.augment)

Stored bytes are what the feature cache keeps once a split is merged: float16 rows (items x stored
tokens after pooling x width, per requested layer), the labels/groups entry (two int64 per item)
and each entry's .npy header and JSON record. While a split is being merged its chunks and the
merged entries coexist, so a split briefly takes up to twice its bytes.
Forward FLOPs are counted by torch (totobench.model.flops.count_flops: 2 x multiply-accumulates of
the matmuls, convolutions and attention, tokenizer included) on one item of the split's shape,
through the deepest requested layer only, without computing anything (meta or fake tensors).

Sizes on the command line (`--cache-budget`) are decimal: K = 1e3, M = 1e6, G = 1e9, T = 1e12
bytes (KB/GB/TB the same); KiB, MiB, GiB, TiB are powers of 1024.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from totobench.errors import ConfigError

FEATURE_BYTES = 2            # float16, as the cache stores features
META_BYTES_PER_ITEM = 16     # the labels/groups entry: two int64 per item
ENTRY_OVERHEAD = 400         # bytes of one cache entry beyond its rows: .npy header (128) + JSON record(s)
BUDGET_SHARE = 0.5           # default --cache-budget: this share of the free disk under the cache folder

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


def parse_size(text: str | int) -> int:
    """A size in bytes: "500G", "1T", "1.5GB", "2TiB", "0", "123" (decimal units; see the module).
    Raises ConfigError naming --cache-budget for anything else (negative, unknown unit, empty)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]i?)?b?\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise ConfigError(f"--cache-budget {text!r}: expected a size such as 0, 500G, 1.5TB or 2TiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def format_bytes(n: int | float) -> str:
    """Decimal units, three significant digits: 1234567 -> "1.23 MB"."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def format_flops(n: int | float) -> str:
    """TFLOPs with thousands separators from 1e12 on, else GFLOPs: "81,552.8 TFLOPs", "8.84 GFLOPs"."""
    return f"{n / 1e12:,.1f} TFLOPs" if n >= 1e12 else f"{n / 1e9:.3g} GFLOPs"


def default_cache_budget(cache_dir: str | Path) -> int:
    """BUDGET_SHARE (half) of the free bytes on the disk that holds `cache_dir` (or its nearest
    existing parent, when the folder does not exist yet): room for one task's features while
    leaving the rest of the disk to everything else."""
    path = Path(cache_dir).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free * BUDGET_SHARE)


@dataclass(frozen=True)
class SplitEstimate:
    """One split as the extractor will read and the cache will store it."""
    split: str                    # "train", "val", "demos", "rollouts", ...
    items: int                    # extractor items (images, clips, views, tiles, decisions)
    stored_tokens_per_item: int   # rows of one item after pooling (1 for mean pooling; 0: nothing stored)
    width: int                    # features per token (the model's dim)
    layers: int                   # layers stored
    bytes: int                    # what the cache keeps for this split (see the module docstring)
    forward_tokens: int           # tokens the backbone reads for the whole split
    flops: int                    # forward FLOPs for the whole split

    @property
    def bytes_per_layer(self) -> int:
        return self.items * self.stored_tokens_per_item * self.width * FEATURE_BYTES

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_layer": self.bytes_per_layer}


def split_estimate(backbone, layers: list[int], split: str, items: int, frames: int, height: int, width: int,
                   kind: str, pooling: str, store: bool = True) -> SplitEstimate:
    """The estimate of `items` items of `frames` frames of height x width pixels read as `kind`,
    pooled with `pooling` and stored for every layer of `layers` (store=False: read, not stored,
    e.g. robot rollouts)."""
    grid = backbone.token_grid(frames, height, width, kind)
    stored = stored_tokens(grid, pooling) if store else 0
    n_layers = len(layers) if store else 0
    rows = items * stored * backbone.dim * FEATURE_BYTES * n_layers
    overhead = (items * META_BYTES_PER_ITEM + ENTRY_OVERHEAD * (n_layers + 1)) if store else 0
    per_item = item_flops(backbone, frames, height, width, kind, max(layers))
    return SplitEstimate(split=split, items=items, stored_tokens_per_item=stored, width=backbone.dim,
                         layers=n_layers, bytes=rows + overhead, forward_tokens=items * grid[0] * grid[1] * grid[2],
                         flops=items * per_item)


def stored_tokens(grid: tuple[int, int, int], pooling: str) -> int:
    """Rows one item keeps after `pooling` (features.extract.pool_tokens) of a (T', h, w) token grid."""
    t, h, w = grid
    if pooling == "mean":
        return 1
    if pooling == "tokens":
        return t * h * w
    if pooling == "last_frame":
        return h * w
    if pooling.startswith("tokens_pool"):
        k = int(pooling.removeprefix("tokens_pool"))
        return t * (h // k) * (w // k)
    raise ValueError(f"unknown pooling {pooling!r}")


_FLOPS: dict[tuple, int] = {}   # (model id, item shape, kind, deepest layer) -> FLOPs of one item


def item_flops(backbone, frames: int, height: int, width: int, kind: str, deepest: int) -> int:
    """Forward FLOPs of one item [1, frames, 3, height, width] read as `kind` through block
    `deepest`, counted without computing: on the meta device when the model is there, else with
    fake tensors; a family whose forward fake tensors cannot trace is counted by a real forward
    of that one item."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from totobench.model.flops import count_flops
    key = (backbone.features_id, frames, height, width, kind, deepest)
    if key in _FLOPS:
        return _FLOPS[key]
    shape, device = (1, frames, 3, height, width), backbone.device
    run = lambda x: backbone._forward(x, [deepest], kind)  # noqa: E731
    if device.type == "meta":
        flops = count_flops(lambda: run(torch.zeros(shape, device=device)))
    else:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                flops = count_flops(lambda: run(torch.zeros(shape, device=device)))
        except Exception:  # noqa: BLE001 - a forward fake tensors cannot trace (data-dependent shapes)
            flops = count_flops(lambda: run(torch.zeros(shape, device=device)))
    _FLOPS[key] = int(flops)
    return _FLOPS[key]


@dataclass(frozen=True)
class TaskEstimate:
    """A task run's estimate: its splits, what the cache keeps and the forward cost.
    `streamed`: whether its probe trains streamed under `budget` (None: the task has no streamed
    path, e.g. DAVIS propagates one sequence at a time); `budget` None means no limit."""
    task: str
    splits: tuple[SplitEstimate, ...]
    stored_bytes: int
    train_bytes: int
    forward_flops: int
    streamed: bool | None = None
    budget: int | None = None
    train_passes: int = 1         # times the training split goes through the backbone (streamed: epochs)

    @classmethod
    def of(cls, task: str, splits: list[SplitEstimate], budget: int | None, augment: bool = False,
           streamable: bool = True, epochs: int = 1) -> "TaskEstimate":
        """Sum the splits ("train" is the split the probe trains on) and decide the streaming; a
        streamed probe reads the training split once per epoch, so its forward counts `epochs` times
        (the stored bytes stay what a cached run would keep)."""
        train_flops = sum(s.flops for s in splits if s.split == "train")
        est = cls(task=task, splits=tuple(splits), stored_bytes=sum(s.bytes for s in splits),
                  train_bytes=sum(s.bytes for s in splits if s.split == "train"),
                  forward_flops=sum(s.flops for s in splits), budget=budget)
        if not streamable:
            return est
        streamed = decide_streaming(est, budget, augment)
        if not streamed or epochs <= 1:
            return replace(est, streamed=streamed)
        return replace(est, streamed=True, forward_flops=est.forward_flops + (epochs - 1) * train_flops,
                       train_passes=epochs)

    @property
    def bytes_per_layer(self) -> int:
        """Feature bytes of one layer, all splits together."""
        return sum(s.bytes_per_layer for s in self.splits if s.layers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the budget: it follows the free disk, a fact of the host (the runner
        records it in the result's `env`), and two runs of one command must give equal protocols."""
        return {"task": self.task, "splits": [s.as_dict() for s in self.splits], "stored_bytes": self.stored_bytes,
                "train_bytes": self.train_bytes, "bytes_per_layer": self.bytes_per_layer,
                "forward_flops": self.forward_flops, "streamed": self.streamed, "train_passes": self.train_passes}

    def decision(self) -> str:
        """"train cached", "train streamed" or "no streamed path", with the budget."""
        budget = "no limit" if self.budget is None else format_bytes(self.budget)
        if self.streamed is None:
            return f"cached, no streamed path (budget {budget})"
        return f"train {'streamed' if self.streamed else 'cached'} (budget {budget})"

    def summary(self) -> str:
        """One line: feature bytes as the cache would keep them (per layer), forward FLOPs, cached or
        streamed."""
        layers = max((s.layers for s in self.splits), default=0)
        return (f"{self.task}: features {format_bytes(self.stored_bytes)} ({layers} layer(s) x "
                f"{format_bytes(self.bytes_per_layer)}), forward {format_flops(self.forward_flops)}"
                f"{f' (train read {self.train_passes}x)' if self.train_passes > 1 else ''}; "
                f"{self.decision()}")


def decide_streaming(estimate: TaskEstimate, budget: int | None, augment: bool = False) -> bool:
    """Whether the probe trains streamed: always with augmentation (each epoch sees new views, which
    a cache cannot hold), else when the training split's features exceed the budget (None: no
    limit). Evaluation splits go through the cache when they fit what is left."""
    if augment:
        return True
    return budget is not None and estimate.train_bytes > budget
