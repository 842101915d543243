"""Rows of one split, read by index in batches: what a probe trains on, stored or streamed.

    rows.read(index, batch_size)  ->  ({layer: features [b, ...] fp32}, rows [b]) per slice of index

`ArrayRows` reads stored features (the cache's float16 memmaps, or any arrays). `StreamedRows`
computes them on the fly: each read sends its items through the backbone (one forward for all
requested layers), pools them as the extractor does and rounds them to float16 as the cache
stores them, so a probe trained streamed reads the numbers it would have read from the cache.
Under torchrun the probes train data-parallel: rows split among the ranks (`split_among_ranks`, or
`bind(..., shared=True)`) yield only this rank's share of every slice (rows rank, rank + world, ...
of the slice; a share may be empty, and is still yielded so that every rank sees every slice),
and the probe all-reduces what it computes from them (probes/linear.py, probes/attentive.py).
Nothing is gathered here: each rank keeps its own rows. With `segments` > 1 a row is a probe input
made of that many consecutive items, joined as the cache's features.views.JoinedRows joins them;
ranks share out whole inputs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from totobench import parallel
from totobench.errors import ConfigError
from totobench.features.extract import Indexed, collate_indexed, iterate_layer_tokens, pool_tokens
from totobench.features.views import join_segments, joined_row


def gather_rows(features, index: torch.Tensor, device="cpu") -> torch.Tensor:
    """Rows `index` of a feature array (torch tensor, numpy array or memmap, any float dtype) as fp32 on device."""
    if isinstance(features, torch.Tensor):
        rows = features[index.to(features.device)]
    else:
        rows = torch.from_numpy(np.ascontiguousarray(features[index.numpy()]))
    return rows.to(device=device, dtype=torch.float32)


Batch = tuple[dict[int, torch.Tensor], torch.Tensor]


class Rows:
    """Rows of a split: `labels` [N] (known before any read), `row_shape` (features of one row),
    `read(index, batch_size, device)` and, for training-time augmentation, `for_epoch(epoch)`.
    `streamed`: whether every read recomputes the rows (then probes never keep them resident).
    `share` (rank, world): reads yield rows rank, rank + world, ... of each slice; (0, 1) reads all."""
    streamed = False
    share: tuple[int, int] = (0, 1)

    def __init__(self, labels, layers: list[int], row_shape: tuple[int, ...]):
        # a copy (callers may pass read-only arrays), on the CPU
        self.labels = (labels.detach().cpu().long().clone() if isinstance(labels, torch.Tensor)
                       else torch.as_tensor(np.array(labels)).long())
        self.layers, self.row_shape = list(layers), tuple(row_shape)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: torch.Tensor, batch_size: int, device="cpu") -> Iterator[Batch]:
        """Yield ({layer: features [b, *row_shape] fp32 on device}, rows [b]) over consecutive slices
        of `index` of batch_size items (b smaller only at the end, or where items could not be read)."""
        raise NotImplementedError

    def for_epoch(self, epoch: int) -> "Rows":
        """The rows training epoch `epoch` reads (other than self only with augmentation)."""
        return self

    @property
    def shared(self) -> bool:
        """Whether reads yield this rank's share only (the probe then all-reduces over the ranks)."""
        return self.share[1] > 1

    def split_among_ranks(self, split: bool = True) -> "Rows":
        """Read this rank's share of every slice from now on (split=True under torchrun; a no-op
        outside it), or all of it (split=False)."""
        dist = parallel.info()
        self.share = (dist.rank, dist.world_size) if split and dist.active else (0, 1)
        return self

    def _share_of(self, piece: torch.Tensor) -> torch.Tensor:
        """This rank's rows of one slice of an index."""
        rank, world = self.share
        return piece[rank::world] if world > 1 else piece


class ArrayRows(Rows):
    """Stored features {layer: [N, ...]}; memmaps of cache entries are pickled by file name (cheap to
    send to other ranks, which share the cache folder)."""

    def __init__(self, feats: Mapping[int, Any], labels=None):
        layers = list(feats)  # the caller's order (the attentive grid initialises its heads in it)
        first = feats[layers[0]]
        labels = np.full(len(first), -1) if labels is None else labels  # None: rows read for features only
        super().__init__(labels, layers, tuple(first.shape[1:]))
        self.feats = dict(feats)

    def read(self, index: torch.Tensor, batch_size: int, device="cpu") -> Iterator[Batch]:
        for start in range(0, len(index), batch_size):
            rows = self._share_of(index[start:start + batch_size])
            yield {layer: gather_rows(self.feats[layer], rows, device) for layer in self.layers}, rows

    def __getstate__(self):
        state = dict(self.__dict__)
        # a memmap whose file was renamed since (a fresh cache entry) travels as its rows
        state["feats"] = {layer: ("memmap", str(a.filename), a.dtype.str, a.shape, a.offset)
                          if isinstance(a, np.memmap) and a.filename and os.path.exists(a.filename) else a
                          for layer, a in self.feats.items()}
        return state

    def __setstate__(self, state):
        state["feats"] = {layer: np.memmap(a[1], dtype=np.dtype(a[2]), mode="r", shape=a[3], offset=a[4])
                          if isinstance(a, tuple) and a and a[0] == "memmap" else a
                          for layer, a in state["feats"].items()}
        self.__dict__.update(state)


class StreamedRows(Rows):
    """Items of a dataset (extractor items: dicts, see features.extract.collate_indexed) whose pooled
    features are computed at every read. `bind(backbone, device)` before reading; the binding is not
    pickled (each rank binds its own backbone). `epoch_items(epoch)`: the dataset of a training epoch
    (augmented views, the same items in the same order), None: `items` every epoch.

    segments > 1: row r (one probe input, `labels` [N] one per input) is the run of items
    r * segments .. r * segments + segments - 1, pooled and joined as the cache's JoinedRows joins
    them (features.views.join_segments: tokens concatenated, pooled rows averaged), so
    len(items) == segments * len(labels). `item_shape`: the pooled features of one item;
    `row_shape` is that of a joined row. A forward takes the items of forward_batch // segments
    inputs (at least one input). Unreadable items (frames None) are listed in `skipped`
    [(path, reason)]; the rows they belong to are left out of the read and listed in `dropped`."""
    streamed = True

    def __init__(self, items: Dataset, labels, layers: list[int], item_shape: tuple[int, ...], *, kind: str,
                 pooling: str, forward_batch: int, num_workers: int = 0,
                 epoch_items: Callable[[int], Dataset] | None = None, segments: int = 1):
        self.segments, self.item_shape = max(1, int(segments)), tuple(item_shape)
        shape, self.row_dtype = joined_row(self.item_shape, self.segments)
        super().__init__(labels, layers, shape)
        if len(items) != self.segments * len(self.labels):
            raise ValueError(f"{len(items)} items do not make {len(self.labels)} rows of {self.segments} segment(s)")
        self.items, self.kind, self.pooling = items, kind, pooling
        self.forward_batch, self.num_workers, self.epoch_items = max(1, forward_batch), num_workers, epoch_items
        self.skipped: list[tuple[str, str]] = []
        self.dropped: list[int] = []  # rows with an unreadable item
        self.forwarded = 0            # items this process sent through the backbone (all reads)
        self._bound: tuple | None = None

    def bind(self, backbone, device, shared: bool = False) -> "StreamedRows":
        """Attach the backbone this process forwards with; shared=True under torchrun (every rank
        reads, forwards and yields its share of every slice: `split_among_ranks`)."""
        self._bound = (backbone, torch.device(device))
        return self.split_among_ranks(shared)

    def __getstate__(self):
        return {**self.__dict__, "_bound": None}

    def for_epoch(self, epoch: int) -> "StreamedRows":
        if self.epoch_items is None:
            return self
        view = StreamedRows(self.epoch_items(epoch), self.labels, self.layers, self.item_shape, kind=self.kind,
                            pooling=self.pooling, forward_batch=self.forward_batch, num_workers=self.num_workers,
                            segments=self.segments)
        view._bound, view.skipped, view.dropped, view.share = self._bound, self.skipped, self.dropped, self.share
        return view

    def read(self, index: torch.Tensor, batch_size: int, device="cpu") -> Iterator[Batch]:
        if self._bound is None:
            raise RuntimeError("StreamedRows.read needs bind(backbone, device) first")
        backbone, forward_device = self._bound
        slices = [index[s:s + batch_size] for s in range(0, len(index), batch_size)]
        # ranks share out whole rows (all segments of an input on one rank): each joins its own
        shares = [self._share_of(piece) for piece in slices]
        per_forward = max(1, self.forward_batch // self.segments)
        pieces = [share[p:p + per_forward].tolist() for share in shares
                  for p in range(0, len(share), per_forward)]
        forwarded = self._forward(backbone, pieces, forward_device)
        for share in shares:
            feats, rows = self._take(forwarded, len(share))
            yield {layer: f.to(device, torch.float32) for layer, f in feats.items()}, rows

    def _forward(self, backbone, pieces: list[list[int]], device) -> Iterator[tuple[int, dict, torch.Tensor]]:
        """(asked, {layer: joined rows [b, ...] CPU, row_dtype}, rows [b]) per piece of rows, one
        backbone forward each (for the items of the piece's rows)."""
        items = self.items if getattr(self.items, "yields_dicts", False) else Indexed(self.items)
        seg = self.segments
        item_pieces = [[r * seg + s for r in piece for s in range(seg)] for piece in pieces]
        loader = DataLoader(items, batch_sampler=item_pieces, num_workers=self.num_workers,
                            collate_fn=collate_indexed)
        for (tokens, batch), piece, item_piece in zip(
                iterate_layer_tokens(backbone, loader, self.layers, self.kind, device), pieces, item_pieces):
            self.skipped.extend(batch["skipped"])
            self.forwarded += len(item_piece)
            read = batch["index"]
            # a row is kept when all its segments were read (read items come in the asked order)
            whole = torch.bincount(read // seg, minlength=max(piece) + 1)[read // seg] == seg
            rows = (read[whole] // seg)[::seg]
            self.dropped.extend(sorted(set(piece) - set(rows.tolist())))
            # rounded as the cache stores them: streamed and cached probes read the same numbers
            feats = {layer: self._joined(pool_tokens(tokens[layer], self.pooling)[whole.to(tokens[layer].device)])
                     for layer in self.layers} if tokens else {}
            yield len(piece), feats, rows

    def _joined(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled items [b * segments, ...] -> rows [b, *row_shape] on the CPU, as the cache reads them."""
        rounded = pooled.to("cpu", torch.float16)
        return rounded if self.segments == 1 else join_segments(rounded, self.segments)

    def _take(self, forwarded: Iterator, count: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The next `count` asked rows of `forwarded` as one batch, row_dtype (unreadable ones left out)."""
        feats: dict[int, list] = {layer: [] for layer in self.layers}
        rows, taken = [], 0
        while taken < count:
            asked, piece_feats, piece_rows = next(forwarded)
            taken += asked
            rows.append(piece_rows)
            for layer, f in piece_feats.items():
                feats[layer].append(f)
        empty = torch.zeros((0, *self.row_shape), dtype=_TORCH_DTYPES[self.row_dtype])
        return ({layer: torch.cat(f or [empty]) for layer, f in feats.items()},
                torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def in_index_order(index: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                   dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows [b], values with b along `dim`) of reads of `index` split among ranks,
    gathered (on every rank, on the CPU) and put in the order one process's read of `index` yields
    them: (rows [M], values). Rows no rank could read stay absent."""
    parts = parallel.gather_objects((rows.cpu(), values.cpu()))
    rows, values = torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts], dim)
    where = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=torch.long)
    where[index] = torch.arange(len(index))
    order = torch.argsort(where[rows])
    return rows[order], values.index_select(dim, order)


def pooled_row_shape(backbone, pooling: str, kind: str, frames: int, resolution: int) -> tuple[int, ...]:
    """The shape of one item's pooled features (what the cache stores per row), from the token grid."""
    grid = backbone.token_grid(frames, resolution, resolution, kind)
    return tuple(pool_tokens(torch.zeros(1, *grid, backbone.dim), pooling).shape[1:])


def split_bytes(num_items: int, row_shape: tuple[int, ...], num_layers: int, itemsize: int = 2) -> int:
    """Bytes of a split's cached features: items x row x layers x float16."""
    return num_items * math.prod(row_shape) * num_layers * itemsize


def item_labels(dataset: Dataset, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], groups [N]) of a dataset's items before any is decoded (its `labels_and_groups()`);
    ConfigError when the dataset cannot list them (then it cannot stream)."""
    listed = getattr(dataset, "labels_and_groups", None)
    if listed is None:
        raise ConfigError(f"{where}: its dataset ({type(dataset).__name__}) does not list its labels before "
                          f"decoding, so it cannot stream; raise --cache-budget")
    labels, groups = listed()
    return np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)
