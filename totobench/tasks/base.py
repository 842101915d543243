"""The task template: what every task does, and the few things a task kind supplies.

`Task.run` resolves the input settings against the model, extracts the features of its splits
through the one extractor (all requested layers in one pass, through the feature cache), fits the
registered probe the YAML names, scores the probe's outputs with the task's metric, keeps the
metrics the YAML asks for and writes the protocol record. A task kind supplies:

- its typed YAML sections: `Dataset`, `Input`, `Quick` (frozen dataclasses of `Settings`; their
  defaults are the only defaults);
- `consumes`: the kind of probe output it scores (class scores, STA outputs, soft masks, a policy);
- `metric_names(cfg)`: the metrics it can report (the YAML `metrics:` picks among them);
- `splits(ctx, inputs)`: its train and val splits as extractor datasets with their cache keys;
- `probe_data(split, features)`: the features and targets the probe reads; `score(...)`: metrics.

Tasks whose evaluation is not "extract two splits, fit, score" (DAVIS: one video at a time; the
robot: closed-loop rollouts) override `evaluate` and keep everything else. docs/adding-a-task.md
walks through adding a task.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from rich.console import Console

from totobench.errors import ConfigError, DataError
from totobench.features.extract import LayerFeatures, extract_features
from totobench.features.estimate import TaskEstimate, split_estimate
from totobench.probes.base import CLASS_SCORES, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec
from totobench.registry import PROBES
from totobench.settings import Settings
from totobench.tasks import streaming


@dataclass(frozen=True)
class DatasetSpec(Settings):
    """`dataset:` where the data is (null root: --data-root, $TOTOBENCH_DATA_ROOT, else the data world)."""
    format: str = ""
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # planning only (`totobench run --dry-run`): entries per split as [train, val], or one number for
    # train (val counted from the data); entries are images, videos or annotated frames (DAVIS:
    # val frames). A real run with it set stops with a ConfigError: it never changes what is read.
    size: int | tuple[int, ...] | None = field(default=None, metadata={"min": 0})

    def check(self, where: str) -> None:
        if isinstance(self.size, tuple) and len(self.size) not in (1, 2):
            raise ConfigError(f"{where}.size: expected one number (train) or [train, val], got {list(self.size)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; `size` only when set, so results made before it existed still answer."""
        out = super().as_dict()
        if out.get("size") is None:
            out.pop("size", None)
        return out


@dataclass(frozen=True)
class InputSpec(Settings):
    """`input:` how frames are prepared; null values are filled from the model (see MODEL_INPUTS)."""
    resolution: int | None = field(default=None, metadata={"min": 1})


@dataclass(frozen=True)
class QuickSpec(Settings):
    """`quick:` what `--quick` shrinks."""
    epochs: int | None = field(default=None, metadata={"min": 1})


# input setting -> the model config attribute that fills it when the YAML leaves it null
MODEL_INPUTS = {"resolution": "resolution", "frames": "num_frames", "stride": "frame_stride"}


@dataclass(frozen=True)
class TaskConfig:
    """One task variant, validated: the merged YAML (with --set) as typed sections."""
    name: str
    path: str
    kind: str                       # the YAML `class:`, a key of totobench.registry.TASKS
    description: str
    dataset: DatasetSpec
    input: InputSpec
    probe: ProbeSpec
    quick: QuickSpec
    metrics: tuple[str, ...]        # what the result reports (the task's metric names, fnmatch patterns allowed)
    main_metric: str
    reference: str = ""             # what the paper or its reference code does (docs/protocols.md)
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 0

    def record(self) -> dict[str, Any]:
        """The resolved config as written into the result file (every default filled in)."""
        return {"task": self.name, "class": self.kind, "description": self.description, "reference": self.reference,
                "dataset": self.dataset.as_dict(), "input": self.input.as_dict(), "probe": self.probe.as_dict(),
                "metrics": list(self.metrics), "main_metric": self.main_metric, "quick": self.quick.as_dict(),
                "seed": self.seed, "batch_size": self.batch_size, "num_workers": self.num_workers}


# Keys of a task's record that cannot change its numbers: a result made before they changed still answers
NUMBER_FREE_KEYS = ("description", "reference", "num_workers")


def numbers_settings(record: dict) -> dict:
    """A task record (TaskConfig.record(), or the `config` of a result file) without the keys that
    cannot change the numbers: two runs whose numbers_settings are equal measure the same thing."""
    return {k: v for k, v in record.items() if k not in NUMBER_FREE_KEYS}


@dataclass
class RunContext:
    """What the runner hands a task: the frozen backbone and where to read and write."""
    backbone: Any                 # totobench.model.backbone.Backbone
    layers: list[int]             # non-negative, sorted, unique
    device: torch.device
    quick: bool
    data_root: Path | None        # this task's dataset root (None for simulator tasks)
    artifacts_dir: Path           # side outputs: DAVIS masks, STA predictions, probe resume state
    cache: Any                    # totobench.features.cache.FeatureCache
    console: Console
    seed: int = 0
    num_workers: int = 0
    batch_size: int = 64
    strict: bool = False          # --strict: an unreadable item stops the run instead of being skipped
    cache_budget: int | None = None   # bytes this task may add to the feature cache (None: no limit; 0: stream)
    precision: str = "fp32"       # backbone forward: fp32, bf16 or fp16 (autocast; probes and metrics in fp32)


@dataclass
class LayerRow:
    layer: int
    metrics: dict[str, float]
    best_hparams: dict[str, Any] = field(default_factory=dict)
    select_score: float | None = None


@dataclass
class Split:
    """One split, ready for the extractor."""
    name: str                      # "train", "val"
    dataset: Any                   # items as the extractor reads them (see features.extract)
    key: dict[str, Any]            # feature-cache key parts that identify its items and transform
    kind: str = "image"            # "image": every frame its own sequence; "video": one clip sequence
    batch_size: int = 64
    info: dict[str, Any] = field(default_factory=dict)   # what probe_data/score need (classes, annotations, ...)


@dataclass
class Evaluation:
    """What `evaluate` gives back to `run`."""
    rows: list[LayerRow]
    fingerprint: str
    facts: dict[str, Any] = field(default_factory=dict)     # protocol facts: split sizes, grids, ...
    extra: dict[str, Any] = field(default_factory=dict)     # result `extra`: skipped items, cache hits
    timing: dict[str, float] = field(default_factory=dict)
    streaming: dict[str, Any] = field(default_factory=lambda: {"streamed": False})  # protocol: streamed, budget


@dataclass
class TaskOutput:
    per_layer: list[LayerRow]
    protocol: dict[str, Any]
    dataset_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)


class Task:
    """Base class of every task kind (registered in totobench.registry.TASKS)."""
    kind: ClassVar[str] = ""
    Dataset: ClassVar[type[DatasetSpec]] = DatasetSpec
    Input: ClassVar[type[InputSpec]] = InputSpec
    Quick: ClassVar[type[QuickSpec]] = QuickSpec
    consumes: ClassVar[str] = CLASS_SCORES
    default_probe: ClassVar[str] = "linear"
    keep_outputs: ClassVar[bool] = False      # classification probes return val scores (for `score`)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.name = cfg.name

    # ------------------------------------------------------------------ what a task kind supplies
    @classmethod
    def metric_names(cls, cfg: TaskConfig) -> tuple[str, ...]:
        """Every metric this task can report for `cfg`."""
        return ("top1", "top5")

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        raise NotImplementedError

    def probe_data(self, split: Split, features: LayerFeatures) -> ProbeData:
        """What the probe reads of one extracted split (default: the readable rows and their class labels)."""
        f = readable_rows(features)
        return ProbeData(feats=f.feats, labels=f.labels, num_classes=split.info.get("num_classes"))

    def score(self, ctx: RunContext, results: dict[int, LayerResult], val: Split,
              val_data: ProbeData) -> list[LayerRow]:
        """Per-layer rows from the probe's results (default: the metrics the probe measured)."""
        return [LayerRow(layer=layer, metrics=r.metrics, best_hparams=r.best_hparams, select_score=r.select_score)
                for layer, r in sorted(results.items())]

    def facts(self, train: Split, val: Split, train_data: ProbeData, val_data: ProbeData) -> dict[str, Any]:
        """Protocol facts of this run (split sizes, ...)."""
        return {}

    def fingerprint(self, train: Split, val: Split) -> str:
        return val.key.get("dataset", "")

    # ------------------------------------------------------------------ the shared steps
    @property
    def probe(self) -> Probe:
        return PROBES.get(self.cfg.probe.name)()

    def quick_limit(self, key: str, quick: bool) -> int | None:
        """A subset size from the `quick:` section when running with --quick, else None."""
        return getattr(self.cfg.quick, key) if quick else None

    def probe_spec(self, quick: bool) -> ProbeSpec:
        """The YAML's probe spec, with `quick.epochs` under --quick."""
        spec = self.cfg.probe
        if quick and self.cfg.quick.epochs is not None and hasattr(spec, "epochs"):
            spec = spec.replace(epochs=self.cfg.quick.epochs)
        return spec

    def resolve_input(self, backbone) -> dict[str, Any]:
        """The input settings with nulls filled from the model's config."""
        inputs = self.cfg.input.as_dict()
        for key, attribute in MODEL_INPUTS.items():
            if key in inputs and inputs[key] is None:
                inputs[key] = getattr(backbone.inputs, attribute)
        return inputs

    def probe_context(self, ctx: RunContext) -> ProbeContext:
        features_id = getattr(ctx.backbone, "features_id", getattr(ctx.backbone, "sha256", ""))
        return ProbeContext(device=ctx.device, seed=ctx.seed, state_dir=ctx.artifacts_dir,
                            model_heads=getattr(ctx.backbone, "num_heads", None), console=ctx.console, desc=self.name,
                            run_key=f"{features_id}:{self.name}", keep_outputs=self.keep_outputs)

    # ------------------------------------------------------------------ estimates (features/estimate.py)
    def estimate(self, ctx: RunContext, inputs: dict, spec: ProbeSpec) -> TaskEstimate:
        """What this run will store in the feature cache and compute, before any extraction: one
        SplitEstimate per split (items from `planned_items`, each a clip of `input.frames` frames, or
        one image, at `input.resolution`; stored tokens from the token grid and `spec.pooling`) and
        whether the probe trains streamed under ctx.cache_budget. Task kinds that do not extract
        "train and val" override it (DAVIS, robot). Remembered for the same arguments: the runner
        prints it, `evaluate` may ask again for the streaming decision."""
        key = (tuple(ctx.layers), ctx.quick, ctx.cache_budget, json.dumps(inputs, sort_keys=True, default=str),
               repr(spec))
        memo = getattr(self, "_estimate_memo", None)
        if memo is not None and memo[0] == key:
            return memo[1]
        frames, res = int(inputs.get("frames") or 1), inputs["resolution"]
        kind = "video" if frames > 1 else "image"
        splits = [split_estimate(ctx.backbone, ctx.layers, name, items, frames, res, res, kind, spec.pooling)
                  for name, items in self.planned_items(ctx, inputs).items()]
        est = TaskEstimate.of(self.name, splits, ctx.cache_budget, augment=bool(getattr(spec, "augment", False)),
                              epochs=int(getattr(spec, "epochs", 1)))
        self._estimate_memo = (key, est)
        return est

    def planned_items(self, ctx: RunContext, inputs: dict) -> dict[str, int]:
        """Extractor items per split name: `dataset.size` entries x `views_per_entry` when the size
        gives both splits (then no data is read), else the lengths of the `splits()` datasets (a
        one-number size replaces train's)."""
        size = self.cfg.dataset.size
        sizes = (size,) if isinstance(size, int) else tuple(size or ())
        if len(sizes) == 2:
            return {name: n * self.views_per_entry(name, inputs) for name, n in zip(("train", "val"), sizes)}
        train, val = self.splits(ctx, inputs)
        self._planned = (id(ctx), json.dumps(inputs, sort_keys=True, default=str), (train, val))
        out = {split.name: len(split.dataset) for split in (train, val)}
        if sizes:
            out[train.name] = sizes[0] * self.views_per_entry(train.name, inputs)
        return out

    def planned_splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        """`splits(ctx, inputs)`, reusing the ones the estimate built for the same context and inputs
        (indexing a real Kinetics split opens every video's header: once is enough)."""
        planned = getattr(self, "_planned", None)
        if planned is not None and planned[:2] == (id(ctx), json.dumps(inputs, sort_keys=True, default=str)):
            self._planned = None
            return planned[2]
        return self.splits(ctx, inputs)

    def views_per_entry(self, split: str, inputs: dict) -> int:
        """Extractor items per dataset entry (image, video, annotated frame) of `split`, for
        `planned_items` with `dataset.size`: 1; a video task that takes several clips or crops of a
        video says how many."""
        return 1

    def extract(self, ctx: RunContext, split: Split, pooling: str) -> LayerFeatures:
        """Features of every requested layer of `split`; under --strict a DataError names the
        first item that could not be read."""
        features = extract_features(ctx.backbone, split.dataset, ctx.layers, kind=split.kind, pooling=pooling,
                                    cache=ctx.cache, batch_size=split.batch_size, num_workers=ctx.num_workers,
                                    device=ctx.device, console=ctx.console, desc=f"{self.name} {split.name}",
                                    key_parts=split.key)
        if ctx.strict and features.skipped:
            path, reason = features.skipped[0]
            raise DataError(f"{path}: {reason or 'unreadable'} ({split.name} split of {self.name}; "
                            f"without --strict it is skipped and listed in the result)")
        return features

    def evaluate(self, ctx: RunContext, inputs: dict, spec: ProbeSpec) -> Evaluation:
        """Extract train and val, fit the probe on every layer, score val. When the train features
        exceed ctx.cache_budget or probe.augment is on, the probe trains streamed instead
        (tasks/streaming.py: each epoch reads train through the backbone; val cached when it fits)."""
        t0 = time.perf_counter()
        train, val = self.planned_splits(ctx, inputs)  # the estimate built them already
        if streaming.streams_train(self, ctx, inputs, spec, train):
            out = streaming.evaluate_streamed(self, ctx, inputs, spec, train, val)
            return Evaluation(rows=out["rows"], fingerprint=self.fingerprint(train, val), facts=out["facts"],
                              extra=out["extra"], streaming=out["streaming"],
                              timing={"extract": out["extract_s"],
                                      "probe": time.perf_counter() - t0 - out["extract_s"]})
        tr, va = self.extract(ctx, train, spec.pooling), self.extract(ctx, val, spec.pooling)
        t1 = time.perf_counter()
        train_data, val_data = self.probe_data(train, tr), self.probe_data(val, va)
        results = self.probe.fit(train_data, val_data, spec, self.probe_context(ctx))
        rows = self.score(ctx, results, val, val_data)
        t2 = time.perf_counter()
        extra = {"feature_cache": "hit" if tr.from_cache and va.from_cache else "miss",
                 **self.skipped(ctx, train, val, tr, va)}
        return Evaluation(rows=rows, fingerprint=self.fingerprint(train, val),
                          facts=self.facts(train, val, train_data, val_data), extra=extra,
                          timing={"extract": t1 - t0, "probe": t2 - t1},
                          streaming={"streamed": False})  # no budget: a default one follows the free disk

    def skipped(self, ctx: RunContext, train: Split, val: Split, tr: LayerFeatures, va: LayerFeatures) -> dict:
        """Result `extra` entries about items that could not be read: {"skipped": {split: {reason:
        [paths]}}, "num_skipped": {split: count}} (and a warning on the console)."""
        return skipped_report(ctx, {"train": tr.skipped, "val": va.skipped})

    def run(self, ctx: RunContext) -> TaskOutput:
        spec = self.probe_spec(ctx.quick)
        inputs = self.resolve_input(ctx.backbone)
        ev = self.evaluate(ctx, inputs, spec)
        for row in ev.rows:
            row.metrics = self.reported(row.metrics)
        probe = self.probe
        protocol = {"probe": spec.name, "grid": spec.grid, "settings": spec.settings,
                    "selection_split": probe.selection_split(spec), "report_split": self.report_split,
                    "seed": ctx.seed, "input": inputs, "data": ev.facts, "reference": self.cfg.reference,
                    "deviations": self.deviations(spec, inputs, ctx), **ev.streaming}
        return TaskOutput(per_layer=ev.rows, protocol=protocol, dataset_fingerprint=ev.fingerprint,
                          extra=ev.extra, timing_s=ev.timing)

    def augmented(self, split: Split, epoch: int, seed: int):
        """The training dataset of epoch `epoch` with the task's training-time augmentation
        (`probe.augment`): extractor items as `split.dataset`'s, new random views per (seed, epoch).
        Task kinds that support it override this; the base raises ConfigError."""
        raise ConfigError(f"task {self.name}: probe.augment is not supported by task class {self.cfg.kind}")

    @property
    def report_split(self) -> str:
        return self.cfg.dataset.val_split

    def deviations(self, spec: ProbeSpec, inputs: dict, ctx: RunContext) -> list[str]:
        """How this run departs from the paper's protocol (the probe's, then the task's own), one
        short sentence each; [] when faithful. Task kinds add theirs."""
        return streaming.probe_deviations(self, ctx, inputs, spec)

    def reported(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics the YAML's `metrics:` selects, in the task's order."""
        return {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in self.cfg.metrics)}


def readable_rows(f: LayerFeatures) -> LayerFeatures:
    """Only the rows of items that could be read (all rows when none was skipped)."""
    keep = np.flatnonzero(f.valid)
    if len(keep) == len(f.labels):
        return f
    return LayerFeatures({layer: np.asarray(a)[keep] for layer, a in f.feats.items()}, f.labels[keep],
                         f.groups[keep], f.from_cache, f.skipped)


def skipped_report(ctx: RunContext, failures: dict[str, list[tuple[str, str]]],
                   up_front: dict[str, dict[str, list]] | None = None) -> dict:
    """{"skipped": {split: {reason: sorted unique paths}}, "num_skipped": {split: count}} from the
    (path, reason) pairs the extractor dropped (and items dropped before extraction)."""
    skipped = {}
    for split, pairs in failures.items():
        out: dict[str, set] = {reason: set(paths) for reason, paths in (up_front or {}).get(split, {}).items()}
        for path, reason in pairs:
            out.setdefault(reason or "unreadable", set()).add(path)
        skipped[split] = {reason: sorted(paths) for reason, paths in sorted(out.items()) if paths}
    counts = {split: sum(len(p) for p in s.values()) for split, s in skipped.items()}
    if any(counts.values()):
        ctx.console.print(f"[yellow]skipped unreadable items: {counts} (listed in the result file)[/]")
    return {"skipped": skipped, "num_skipped": counts}


def check_metrics(task_cls: type[Task], cfg: TaskConfig, where: str) -> None:
    """ConfigError unless every `metrics:` entry names (or matches) a metric of the task and the
    main metric is among those reported."""
    from totobench.registry import did_you_mean
    known = task_cls.metric_names(cfg)
    for pattern in cfg.metrics:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            raise ConfigError(f"{where}: metrics: {pattern!r} is not a metric of task class "
                              f"{cfg.kind}{did_you_mean(pattern, known)}")
    if not any(fnmatch.fnmatchcase(cfg.main_metric, p) for p in cfg.metrics):
        raise ConfigError(f"{where}: main_metric {cfg.main_metric!r} must be one of the reported metrics "
                          f"({', '.join(cfg.metrics)})")
