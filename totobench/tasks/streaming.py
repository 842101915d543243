"""Streamed probe training: when a task's train features do not fit its cache budget.

`Task.evaluate` asks `streams_train` first. When the train features would exceed
`ctx.cache_budget` (0: always; `--no-cache`), or the probe trains on augmented views
(`probe.augment`), `evaluate_streamed` trains the probe with `fit_streamed` on
`features.stream.StreamedRows`: every epoch reads the train split once through the backbone (one
forward for all requested layers), and every head of the grid (layer x lr x wd) steps on each
batch, as dinov2's linear evaluation does. The val split goes through the feature cache when its
features fit the budget, else it is streamed too; the held-out selection slice is read (streamed)
once, from the train split. Nothing of a streamed split is written to the cache. A split whose
probe inputs join `split.info["segments"]` consecutive items (kinetics) streams whole inputs: each
read forwards their items and joins them as the cache's JoinedRows does.

Under torchrun the probe trains data-parallel on every rank in step (a "run" job of
features.distributed): the train and val rows are split among the ranks, each rank forwards (or
reads, for cached val features) only its share of every batch and keeps it; the probe all-reduces
the global row count and the summed gradients of all heads every step (AIM's BatchNorm statistics
too), its normalisation statistics, held-out and val counts, and gathers the val scores, so every
rank takes the one-process step and rank 0 reports the one-process numbers up to float summation
order (tests/test_probe_data_parallel.py). Rows the other ranks could not read come back in their
reports and are dropped on rank 0 as its own.
This module is used by tasks/base.py only and imports nothing of it (the task comes as an object).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from typing import Any

import numpy as np
import torch

from totobench import parallel
from totobench.errors import ConfigError
from totobench.features import distributed
from totobench.features.estimate import format_bytes
from totobench.features.extract import LayerFeatures
from totobench.features.stream import StreamedRows, item_labels, pooled_row_shape, split_bytes
from totobench.probes.base import Probe, ProbeContext, ProbeData, rows_of
from totobench.registry import PROBES


def row_shape(ctx, inputs: dict, spec, split) -> tuple[int, ...]:
    """Pooled features of one item of `split` (what a cache row holds)."""
    frames = (inputs.get("frames") or 1) if split.kind == "video" else 1
    return pooled_row_shape(ctx.backbone, spec.pooling, split.kind, frames, inputs["resolution"])


def streams_train(task, ctx, inputs: dict, spec, train) -> bool:
    """Whether the probe trains streamed: probe.augment is on, or the train features exceed
    ctx.cache_budget (None: no limit) by the task's estimate (features.estimate.decide_streaming).
    ConfigError when it must stream and the probe cannot."""
    augment = bool(getattr(spec, "augment", False))
    if not augment and ctx.cache_budget is None:
        return False
    estimate = task.estimate(ctx, inputs, spec)
    if not estimate.streamed:
        return False
    if type(task.probe).fit_streamed is Probe.fit_streamed:
        why = ("probe.augment is on" if augment else
               f"its train features ({format_bytes(estimate.train_bytes)}) exceed the cache budget")
        raise ConfigError(f"task {task.name}: {why}, but probe {spec.name} cannot stream; raise --cache-budget")
    return True


def probe_deviations(task, ctx, inputs: dict, spec) -> list[str]:
    """The probe's deviations (Probe.deviations), told whether it trains streamed when its
    `deviations` takes `streamed` (the attentive probe's text names the features it trained on)."""
    probe = task.probe
    if "streamed" not in inspect.signature(probe.deviations).parameters:
        return probe.deviations(spec)
    return probe.deviations(spec, streamed=streams_train(task, ctx, inputs, spec, None))


def val_fits(task, ctx, inputs: dict, spec) -> bool:
    """Whether the val features go through the cache: they fit the budget (the streamed train split
    adds nothing to it); budget 0 (--no-cache) streams everything."""
    if ctx.cache_budget is None:
        return True
    val_bytes = sum(s.bytes for s in task.estimate(ctx, inputs, spec).splits if s.split != "train")
    return 0 < val_bytes <= ctx.cache_budget


def _shape_only(labels: np.ndarray, groups: np.ndarray, layers: list[int], shape: tuple[int, ...]) -> LayerFeatures:
    """A split's LayerFeatures with no stored features (zero-stride views of the right shape), so
    that the task's `probe_data` finds the row shape and targets it reads."""
    empty = np.zeros((1, *shape), dtype=np.float16)
    feats = {layer: np.broadcast_to(empty, (len(labels), *shape)) for layer in layers}
    return LayerFeatures(feats, labels, groups, from_cache=False, skipped=[])


def _streamed_split(task, ctx, split, spec, shape, augment: bool) -> tuple[ProbeData, StreamedRows]:
    """A split as ProbeData whose rows are computed by the backbone at every read. A split whose
    probe inputs join runs of consecutive items (split.info["segments"] > 1, e.g. kinetics) streams
    one row per probe input, with the labels the task's `probe_data` gives its inputs."""
    labels, groups = item_labels(split.dataset, f"task {task.name} ({split.name} split)")
    segments = int(split.info.get("segments", 1))
    data = task.probe_data(split, _shape_only(labels, groups, ctx.layers, shape))
    if segments > 1:  # every item is readable as far as is known: one row per run, as the cache's starts
        labels = np.asarray(data.labels)
        if len(labels) * segments != len(split.dataset):
            raise ConfigError(f"task {task.name} ({split.name} split): {len(split.dataset)} items do not make "
                              f"{len(labels)} probe inputs of {segments} segments, so it cannot stream")
    epoch_items = functools.partial(task.augmented, split, seed=ctx.seed) if augment else None
    rows = StreamedRows(split.dataset, labels, ctx.layers, shape, kind=split.kind, pooling=spec.pooling,
                        forward_batch=split.batch_size, num_workers=ctx.num_workers, epoch_items=epoch_items,
                        segments=segments)
    data.feats, data.rows = {}, rows
    return data, rows


def evaluate_streamed(task, ctx, inputs: dict, spec, train, val) -> dict[str, Any]:
    """Train the probe streamed, score val; returns the fields of the task's Evaluation (rows, facts,
    extra, streaming) and "extract_s" (time spent extracting val into the cache)."""
    augment = bool(getattr(spec, "augment", False))
    if augment:
        task.augmented(train, 0, ctx.seed)  # a task class without augmented views says so before any work
    shape = row_shape(ctx, inputs, spec, train)
    train_data, train_rows = _streamed_split(task, ctx, train, spec, shape, augment)
    t0 = time.perf_counter()
    val_rows = None
    if val_fits(task, ctx, inputs, spec):
        va = task.extract(ctx, val, spec.pooling)
        if parallel.info().active and not va.from_cache:  # read back from the entries: memmaps the ranks can open
            va = dataclasses.replace(task.extract(ctx, val, spec.pooling), from_cache=False)
        val_data = task.probe_data(val, va)
    else:
        val_data, val_rows = _streamed_split(task, ctx, val, spec, row_shape(ctx, inputs, spec, val), False)
        va = None
    extract_s = time.perf_counter() - t0
    results = fit_streamed_everywhere(ctx, spec, train_data, val_data, task.probe_context(ctx))
    if val_rows is not None and val_rows.dropped:
        _drop_unread(val_data, val_rows.dropped)
    rows = task.score(ctx, results, val, val_data)
    train_seen = LayerFeatures({}, train_data.labels, train_data.labels, False, list(dict.fromkeys(train_rows.skipped)))
    val_seen = va if va is not None else LayerFeatures({}, val_data.labels, val_data.labels, False,
                                                       list(dict.fromkeys(val_rows.skipped)))
    cache_state = "streamed" if va is None else f"train streamed, val {'hit' if va.from_cache else 'miss'}"
    return {"rows": rows, "facts": task.facts(train, val, train_data, val_data), "extract_s": extract_s,
            "extra": {"feature_cache": cache_state, **task.skipped(ctx, train, val, train_seen, val_seen)},
            "streaming": {"streamed": True, "cache_budget": ctx.cache_budget, "augment": augment,
                          "val_streamed": va is None,
                          "train_bytes": split_bytes(len(train.dataset), shape, len(ctx.layers))}}


def _drop_unread(data: ProbeData, dropped: list[int]) -> None:
    """Unreadable streamed items have no scores (the probe never saw them): drop their labels and
    per-row targets too, as the cached path drops unreadable rows before the probe."""
    n = len(data.labels)
    keep = np.setdiff1d(np.arange(n), np.unique(np.asarray(dropped, dtype=np.int64)))
    data.labels = np.asarray(data.labels)[keep]
    if isinstance(data.targets, np.ndarray) and len(data.targets) == n:
        data.targets = data.targets[keep]


def fit_streamed_everywhere(ctx, spec, train: ProbeData, val: ProbeData, probe_ctx: ProbeContext) -> dict:
    """`probe.fit_streamed` here, and under torchrun on every rank in step (a "run" job: every rank
    reads its share of each batch, data-parallel; ranks > 0 write no state and report only what
    they forwarded and could not read)."""
    if not parallel.info().active:
        return fit_on_rank(ctx.backbone, ctx.device, spec, train, val, probe_ctx)
    # stored features travel as ArrayRows (memmaps by file name), not as pickled arrays
    train, val = (data if data.rows is not None else dataclasses.replace(data, feats={}, rows=rows_of(data))
                  for data in (train, val))
    if not distributed.picklable((train, val, spec)):
        return fit_on_rank(ctx.backbone, ctx.device, spec, train, val, probe_ctx)
    distributed.send_job({"op": "run", "fn": fit_on_rank, "desc": f"{probe_ctx.desc} streamed probe",
                          "kwargs": {"spec": spec, "train": train, "val": val,
                                     "probe_ctx": dataclasses.replace(probe_ctx, console=None, primary=False),
                                     "shared": True}})
    try:
        results = fit_on_rank(ctx.backbone, ctx.device, spec, train, val, probe_ctx, shared=True)
    except Exception as err:  # noqa: BLE001 - the other ranks must still reach the gather
        distributed.send_report(distributed.failure_report(err))
        raise
    reports = distributed.collect_reports({"computed": 0, "reused": 0, "forwarded": _forwarded(train, val)})
    _merge_unread(reports[1:], train, val)
    if ctx.console is not None:
        ctx.console.print(f"[dim]{probe_ctx.desc} streamed probe: items forwarded per rank "
                          f"{[r.get('forwarded', 0) for r in reports]}[/]")
    return results


def fit_on_rank(backbone, device: torch.device, spec, train: ProbeData, val: ProbeData, probe_ctx: ProbeContext,
                shared: bool = False) -> dict:
    """Bind the streamed rows to this process's backbone (shared: split every split's rows among
    the ranks) and fit the probe the spec names; the results ({layer: LayerResult}) on the primary
    process, {"forwarded": items, "unread": [(skipped, dropped) per split]} on the others."""
    for data in (train, val):
        if isinstance(data.rows, StreamedRows):
            data.rows.bind(backbone, device, shared=shared)
        elif data.rows is not None:
            data.rows.split_among_ranks(shared)
    probe_ctx = dataclasses.replace(probe_ctx, device=device)
    results = PROBES.get(spec.name)().fit_streamed(train, val, spec, probe_ctx)
    if probe_ctx.primary:
        return results
    return {"forwarded": _forwarded(train, val),
            "unread": [(data.rows.skipped, data.rows.dropped) if isinstance(data.rows, StreamedRows) else ([], [])
                       for data in (train, val)]}


def _merge_unread(reports: list[dict], *splits: ProbeData) -> None:
    """Add the items the other ranks could not read (their reports' "unread") to this rank's rows,
    so that rank 0 reports and drops them as one process would."""
    for report in reports:
        for data, (skipped, dropped) in zip(splits, report.get("unread", [])):
            if isinstance(data.rows, StreamedRows):
                data.rows.skipped.extend(skipped)
                data.rows.dropped.extend(dropped)


def _forwarded(*splits: ProbeData) -> int:
    """Items this process sent through the backbone for the streamed splits."""
    return sum(data.rows.forwarded for data in splits if isinstance(data.rows, StreamedRows))
