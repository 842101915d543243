"""What a task is: a class registered by kind, built from its YAML config, run against a backbone.

The runner owns everything around a task (model loading, layer parsing, result files); a task
owns its dataset, its probe and its metric, and returns one row per layer.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console

from totobench.errors import ConfigError

# Task kind (the YAML `class:`) -> module that registers it. Imported on first use only, so a
# missing optional dependency of one task (mujoco, pytorchvideo) never breaks the others.
TASK_MODULES = {
    "classification": "totobench.tasks.classification",
    "video_classification": "totobench.tasks.kinetics",
    "label_propagation": "totobench.tasks.davis",
    "ego4d_sta": "totobench.tasks.ego4d_sta",
    "robot_bc": "totobench.tasks.robot",
}
_TASK_CLASSES: dict[str, type["Task"]] = {}


def register_task(kind: str):
    """Class decorator: make a Task subclass available under `class: <kind>` in task YAMLs."""
    def wrap(cls):
        cls.kind = kind
        _TASK_CLASSES[kind] = cls
        return cls
    return wrap


def task_class(kind: str) -> type["Task"]:
    if kind not in _TASK_CLASSES and kind in TASK_MODULES:
        importlib.import_module(TASK_MODULES[kind])
    if kind not in _TASK_CLASSES:
        close = difflib.get_close_matches(kind, TASK_MODULES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(TASK_MODULES)})"
        raise ConfigError(f"unknown task class '{kind}'{hint}")
    return _TASK_CLASSES[kind]


@dataclass
class RunContext:
    """What the runner hands a task: the frozen backbone and where to read and write."""
    backbone: Any                 # totobench.model.registry.Backbone
    layers: list[int]             # non-negative, sorted, unique
    device: torch.device
    quick: bool
    data_root: Path | None        # this task's dataset root (None for simulator tasks)
    artifacts_dir: Path           # side outputs: DAVIS masks, STA predictions, ...
    cache: Any                    # totobench.features.cache.FeatureCache or None
    console: Console
    seed: int = 0
    num_workers: int = 0
    batch_size: int = 64


@dataclass
class LayerRow:
    layer: int
    metrics: dict[str, float]
    best_hparams: dict[str, Any] = field(default_factory=dict)
    select_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # not written: e.g. val scores for a task's own metric


@dataclass
class TaskOutput:
    per_layer: list[LayerRow]
    protocol: dict[str, Any]          # probe, grid, selection_split, report_split, seed, ...
    dataset_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. skipped videos per split
    timing_s: dict[str, float] = field(default_factory=dict)


class Task:
    """Base class. Subclasses set `kind` via @register_task and implement `run`."""
    kind: ClassVar[str] = ""

    def __init__(self, name: str, cfg: dict):
        self.name = name
        self.cfg = cfg

    @property
    def main_metric(self) -> str:
        return self.cfg["main_metric"]

    @property
    def dataset_format(self) -> str:
        return self.cfg["dataset"]["format"]

    def quick_limit(self, key: str, quick: bool, default: int | None = None) -> int | None:
        """A subset size from the YAML `quick:` section when running with --quick, else None."""
        if not quick:
            return None
        return self.cfg.get("quick", {}).get(key, default)

    def run(self, ctx: RunContext) -> TaskOutput:
        raise NotImplementedError
