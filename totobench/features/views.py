"""Probe inputs made of several extracted rows, read lazily: the segments of a video joined.

The extractor stores one row per clip (a segment of a video); V-JEPA 2's frozen video evaluation
joins the tokens of a view's segments into one probe input. `JoinedRows` presents those joined
inputs as one array that reads only the rows asked for, the way a memmap does, so no feature array
is ever copied whole into memory.
"""

from __future__ import annotations

import numpy as np


class JoinedRows:
    """Rows of `base` joined in runs of `segments`: joined row r = base rows starts[r] .. starts[r] +
    segments - 1, in that order.

    base [N, L, D] (token rows) -> [n, segments * L, D]: the tokens of segment 0, then segment 1, ...
    base [N, D] (mean-pooled rows) -> [n, D] float32: the mean over the segments, which is the mean over
    every token of the joined input (each segment has the same number of tokens).
    Indexing takes what a numpy array takes on its first axis (an int, a slice, an int or boolean
    array; a tuple indexes the rows first, then the result) and reads only the base rows needed.
    `np.asarray(joined)` reads every row (for probes that need the whole array, e.g. kNN).
    Raises ValueError when a run would read past the end of base.
    """

    def __init__(self, base, starts, segments: int):
        self.base, self.segments = base, int(segments)
        self.starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {segments}")
        if len(self.starts) and (self.starts.min() < 0 or self.starts.max() + self.segments > len(base)):
            raise ValueError(f"joined rows of {self.segments} segments starting at {self.starts.min()}.."
                             f"{self.starts.max()} do not fit in {len(base)} rows")
        tail = tuple(base.shape[1:])
        self.tokens = len(tail) == 2
        self.shape = (len(self.starts), tail[0] * self.segments, tail[1]) if self.tokens else (len(self.starts), *tail)
        self.dtype = np.dtype(base.dtype) if self.tokens else np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self[index[0]][(slice(None),) + index[1:]]
        one = np.ndim(index) == 0 and not isinstance(index, slice)
        starts = np.atleast_1d(self.starts[index])
        rows = (starts[:, None] + np.arange(self.segments)).reshape(-1)
        out = join_segments(np.asarray(self.base[rows]), self.segments)
        return out[0] if one else out

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


def joined_row(item_shape: tuple[int, ...], segments: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one joined input whose `segments` items each have pooled shape `item_shape`
    (stored as float16): tokens [L, D] -> [segments * L, D] float16; pooled [D] -> [D], float32 when
    segments > 1 (the mean over segments, as JoinedRows and join_segments compute it)."""
    item_shape = tuple(item_shape)
    if len(item_shape) == 2:
        return (segments * item_shape[0], item_shape[1]), np.dtype(np.float16)
    return item_shape, np.dtype(np.float32 if segments > 1 else np.float16)


def join_segments(rows, segments: int):
    """Consecutive runs of `segments` rows joined, as JoinedRows does (numpy array or torch tensor):
    [n * segments, L, D] -> [n, segments * L, D]; [n * segments, D] -> [n, D], the float32 mean.
    For batches computed on the fly (a streamed probe reading `segments` consecutive items per input)."""
    if rows.ndim == 3:
        return rows.reshape(rows.shape[0] // segments, segments * rows.shape[1], rows.shape[2])
    grouped = rows.reshape(rows.shape[0] // segments, segments, *rows.shape[1:])
    if isinstance(grouped, np.ndarray):
        return grouped.mean(axis=1, dtype=np.float32)
    return grouped.float().mean(dim=1)
