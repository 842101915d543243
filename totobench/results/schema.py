"""The result file: one JSON per (model, task), its typed schema, validation and atomic store.

A result file records, for one frozen model on one task, the probe's metrics at every evaluated
layer, which layer is best, and everything needed to trust and reproduce the numbers (checkpoint
sha256, dataset fingerprint, which split chose the hyper-parameters and which split is reported,
the resolved config, the environment, timings). The shape is `ResultFile` below; DESIGN.md shows
an example. Depth is the relative depth of a layer, (layer + 1) / num_layers, so that models of
different depth line up: layer 3 of an 8-layer model has depth 0.5.

Schema versions: `RESULT_SCHEMA_VERSION` is the version this code writes and reads. A reader
meeting any other version refuses the file (one line naming the file and both versions) rather
than guessing. Unknown extra keys are allowed everywhere, so adding an optional field does not
need a new version; renaming, removing or changing the meaning of one does.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from totobench.errors import DataError
from totobench.io import atomic_write

RESULT_SCHEMA_VERSION = "1"


class ModelInfo(TypedDict):
    name: str                  # registered name or checkpoint folder, e.g. "toto-tiny"
    checkpoint_sha256: str     # sha256 of model.safetensors (random-init: of the weights used)
    tokenizer_sha256: NotRequired[str]  # sha256 of the tokenizer's weights (features depend on both)
    num_layers: int            # number of transformer blocks; depth = (layer + 1) / num_layers
    dim: int                   # width of the residual stream
    params: int                # parameters of the feature network (embeddings in; LM head and tokenizer out)
    path: NotRequired[str | None]  # checkpoint folder or weights file (None for random init)
    family: NotRequired[str]   # model family of the spec: checkpoint, preset, llama, timm, hf, pixels
    num_heads: NotRequired[int | None]  # attention heads (None: none, e.g. pixels)
    tokenizer: NotRequired[str | None]  # the tokenizer spec of a token model (dvae:FILE, vqvae:DIR)
    inputs: NotRequired[dict[str, Any]]  # what frames it reads (resolution, patch_size, num_frames, ...)
    notes: NotRequired[list[str]]  # how the family reads frames (e.g. a Llama's sequence layout)


class TaskInfo(TypedDict):
    name: str                  # task variant, e.g. "imagenet", "imagenet-linear"
    kind: NotRequired[str]     # the task class (YAML `class:`), e.g. "classification"
    dataset_format: NotRequired[str]  # e.g. "imagenet", "k400"
    dataset_root: str | None   # None for simulator tasks that have no dataset folder
    dataset_fingerprint: str   # changes when the dataset's files change
    main_metric: str           # key of `metrics` that ranks layers and models (higher is better)


class SplitEstimateInfo(TypedDict):
    split: str                 # "train", "val", "rollouts", ...
    items: int                 # extractor items (images, clips, views, tiles, decisions)
    stored_tokens_per_item: int  # rows of one item after pooling (0: read, not stored)
    width: int
    layers: int                # layers stored
    bytes: int                 # what the feature cache keeps for this split
    forward_tokens: int        # tokens the backbone reads
    flops: int                 # forward FLOPs (2 x MACs)
    bytes_per_layer: NotRequired[int]


class EstimateInfo(TypedDict):
    """What the task estimated before extracting (totobench.features.estimate.TaskEstimate)."""
    task: str
    splits: list[SplitEstimateInfo]
    stored_bytes: int          # bytes the feature cache keeps for the whole task
    train_bytes: int           # of which the split the probe trains on
    forward_flops: int
    streamed: bool | None      # the probe trains streamed under the budget (env.cache_budget; null: no streamed path)
    bytes_per_layer: NotRequired[int]
    train_passes: NotRequired[int]  # times the training split goes through the backbone (streamed: epochs)


class Protocol(TypedDict):
    probe: str                 # "linear", "attentive", "knn", "label_propagation", "bc_mlp", ...
    grid: dict[str, Any]       # hyper-parameter grid searched, e.g. {"lrs": [1e-3, 1e-2]}
    settings: NotRequired[dict[str, Any]]  # every other probe setting (the resolved spec)
    selection_split: str       # split that chose the hyper-parameters, e.g. "train-holdout-10pct"
    report_split: str          # split the metrics are reported on, e.g. "val"
    seed: int
    input: NotRequired[dict[str, Any]]  # the input settings, resolved against the model (frames, resolution, ...)
    data: NotRequired[dict[str, Any]]   # facts of the run: split sizes, classes, views, ...
    reference: NotRequired[str]         # what the paper or its reference code does (docs/protocols.md)
    deviations: NotRequired[list[str]]  # how this run departs from it; [] when faithful
    precision: NotRequired[str]         # the backbone forward: fp32, bf16 or fp16 (autocast); absent: fp32
    estimate: NotRequired[EstimateInfo]  # stored bytes and forward FLOPs, estimated before extracting


class LayerRow(TypedDict):
    layer: int                 # 0-based block index: residual stream after block `layer`
    depth: float               # (layer + 1) / num_layers
    metrics: dict[str, float]  # on the report split
    best_hparams: dict[str, Any]
    select_score: float | None  # score on the selection split of the chosen hyper-parameters


class BestLayer(TypedDict):
    layer: int
    depth: float
    metrics: dict[str, float]


class ResultFile(TypedDict):
    schema_version: str
    totobench_version: str
    created: str               # ISO 8601 UTC, e.g. "2025-01-31T12:00:00Z"
    model: ModelInfo
    task: TaskInfo
    protocol: Protocol
    per_layer: list[LayerRow]
    best_layer: BestLayer
    config: dict[str, Any]     # the resolved task config
    env: dict[str, Any]        # versions, device, host facts
    timing_s: dict[str, float]  # wall seconds per stage, e.g. {"extract": 12.0, "probe": 3.5}
    run: NotRequired[dict[str, Any]]    # how the run was asked for: {"layers": [...], "quick": bool}
    extra: NotRequired[dict[str, Any]]  # task facts such as skipped videos


# ---------------------------------------------------------------------------------------------
# validation

def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_number(value) -> bool:
    # bool is an int in Python but never a metric; numpy scalars register as numbers.Real
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_json_value(value, path: str, problems: list[str]) -> None:
    """Anything typed `Any` must still be plain JSON (no NaN, no arrays, string keys)."""
    if value is None or isinstance(value, (str, bool)):
        return
    if _is_number(value):
        if not math.isfinite(float(value)):
            problems.append(f"{path}: expected a finite number, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}[{i}]", problems)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: expected string keys, got key {key!r}")
            else:
                _check_json_value(item, f"{path}.{key}", problems)
        return
    problems.append(f"{path}: expected a JSON value, got {type(value).__name__}")


def _check_type(value, hint, path: str, problems: list[str]) -> None:
    """Check `value` against a type hint of the TypedDicts above; append 'path: what' problems."""
    if hint is Any:
        _check_json_value(value, path, problems)
        return
    origin = typing.get_origin(hint)
    if origin is NotRequired:
        hint = typing.get_args(hint)[0]
        origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        non_null = [h for h in options if h is not type(None)]
        _check_type(value, non_null[0], path, problems)
        return
    if isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__required_keys__"):
        if not isinstance(value, dict):
            problems.append(f"{path or '(top level)'}: expected an object, got {_type_name(value)}")
            return
        hints = typing.get_type_hints(hint, include_extras=True)
        for key, key_hint in hints.items():
            key_path = f"{path}.{key}" if path else key
            if key not in value:
                # NotRequired read from the hint: __required_keys__ misses it under string annotations
                if typing.get_origin(key_hint) is not NotRequired:
                    problems.append(f"{key_path}: missing (expected {_describe(key_hint)})")
                continue
            _check_type(value[key], key_hint, key_path, problems)
        return
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {_type_name(value)}")
            return
        _, item_hint = typing.get_args(hint)
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: expected string keys, got key {key!r}")
                continue
            _check_type(item, item_hint, f"{path}.{key}", problems)
        return
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_type_name(value)}")
            return
        (item_hint,) = typing.get_args(hint)
        for i, item in enumerate(value):
            _check_type(item, item_hint, f"{path}[{i}]", problems)
        return
    if hint is float:
        if not _is_number(value):
            problems.append(f"{path}: expected a number, got {_type_name(value)}")
        elif not math.isfinite(float(value)):
            problems.append(f"{path}: expected a finite number, got {value}")
        return
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_type_name(value)}")
        return
    if hint is int:
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            problems.append(f"{path}: expected an integer, got {_type_name(value)}")
        return
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_type_name(value)}")
        return
    raise TypeError(f"schema hint not handled: {hint!r}")  # a bug in this module, not user input


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is NotRequired:
        return _describe(typing.get_args(hint)[0])
    if isinstance(hint, type) and hasattr(hint, "__required_keys__"):
        return "an object"
    return {dict: "an object", list: "a list"}.get(origin) or {
        str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def parse_created(text: str) -> datetime.datetime | None:
    """The time of a `created` field ("2025-01-31T12:00:00Z"), or None when it is not ISO 8601 UTC."""
    if not text.endswith("Z"):
        return None
    try:
        return datetime.datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError:
        return None


def validate_result(obj) -> list[str]:
    """Problems of a result dict against `ResultFile`, each "field.path: what was expected".

    Checks types and required fields, then the facts that tie fields together: the schema
    version, the `created` timestamp, layers inside [0, num_layers) and unique, each depth equal to
    (layer + 1) / num_layers, the main metric present in every row, and `best_layer` being one of
    the rows with the same main-metric value. An empty list means the dict is a valid result.
    """
    problems: list[str] = []
    _check_type(obj, ResultFile, "", problems)
    if problems:
        return problems  # the cross-field checks below need the types right

    if obj["schema_version"] != RESULT_SCHEMA_VERSION:
        problems.append(f"schema_version: expected {RESULT_SCHEMA_VERSION!r}, "
                        f"got {obj['schema_version']!r}")
    if parse_created(obj["created"]) is None:
        problems.append(f"created: expected an ISO 8601 UTC time like 2025-01-31T12:00:00Z, "
                        f"got {obj['created']!r}")
    if obj["model"]["params"] < 0:
        problems.append(f"model.params: expected >= 0, got {obj['model']['params']}")
    num_layers = obj["model"]["num_layers"]
    if num_layers < 1:
        problems.append(f"model.num_layers: expected >= 1, got {num_layers}")
        return problems
    for key, seconds in obj["timing_s"].items():
        if seconds < 0:
            problems.append(f"timing_s.{key}: expected >= 0 seconds, got {seconds}")

    main = obj["task"]["main_metric"]
    rows = obj["per_layer"]
    if not rows:
        problems.append("per_layer: expected at least one layer row, got an empty list")
    seen: dict[int, dict] = {}
    for i, row in enumerate(rows):
        where = f"per_layer[{i}]"
        _check_layer_and_depth(row, num_layers, where, problems)
        if row["layer"] in seen:
            problems.append(f"{where}.layer: layer {row['layer']} appears twice")
        seen[row["layer"]] = row
        if main not in row["metrics"]:
            problems.append(f"{where}.metrics: missing the main metric {main!r}")

    best = obj["best_layer"]
    _check_layer_and_depth(best, num_layers, "best_layer", problems)
    if main not in best["metrics"]:
        problems.append(f"best_layer.metrics: missing the main metric {main!r}")
    elif rows and best["layer"] not in seen:
        problems.append(f"best_layer.layer: expected one of the per_layer layers, got {best['layer']}")
    elif rows and main in seen[best["layer"]]["metrics"]:
        row_value = seen[best["layer"]]["metrics"][main]
        if not math.isclose(best["metrics"][main], row_value, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"best_layer.metrics.{main}: expected the value of layer {best['layer']} "
                            f"in per_layer ({row_value}), got {best['metrics'][main]}")
    return problems


def _check_layer_and_depth(row: dict, num_layers: int, where: str, problems: list[str]) -> None:
    layer = row["layer"]
    if not 0 <= layer < num_layers:
        problems.append(f"{where}.layer: expected 0 <= layer < num_layers={num_layers}, got {layer}")
        return
    expected = (layer + 1) / num_layers
    if not math.isclose(row["depth"], expected, abs_tol=1e-6):
        problems.append(f"{where}.depth: expected (layer + 1) / num_layers = {expected:.6g}, "
                        f"got {row['depth']}")


def created_now() -> str:
    """The current UTC time in the form of the `created` field, e.g. "2025-01-31T12:00:00Z"."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def depth_fraction(layer: int, num_layers: int) -> float:
    """Relative depth of 0-based block `layer`: 1/num_layers for the first block, 1.0 for the last."""
    return (layer + 1) / num_layers


def build_result(*, model: dict, task: dict, protocol: dict, per_layer: list[dict], config: dict,
                 env: dict, timing_s: dict, run: dict, extra: dict, version: str) -> dict:
    """The one place a result document is assembled (every key it writes is declared above).

    per_layer: [{"layer", "metrics", "best_hparams", "select_score"}]; depth and the best layer
    (highest main metric, the shallower layer on ties) are computed here. Raises DataError when a
    row lacks the main metric."""
    n, main = model["num_layers"], task["main_metric"]
    rows = [{"layer": r["layer"], "depth": depth_fraction(r["layer"], n), "metrics": r["metrics"],
             "best_hparams": r["best_hparams"], "select_score": r["select_score"]} for r in per_layer]
    missing = [r["layer"] for r in rows if main not in r["metrics"]]
    if missing:
        raise DataError(f"task {task['name']} gave no {main!r} for layers {missing}")
    best = max(rows, key=lambda r: (r["metrics"][main], -r["layer"]))
    return {"schema_version": RESULT_SCHEMA_VERSION, "totobench_version": version, "created": created_now(),
            "model": model, "task": task, "protocol": protocol, "per_layer": rows,
            "best_layer": {"layer": best["layer"], "depth": best["depth"], "metrics": best["metrics"]},
            "config": config, "env": env, "timing_s": timing_s, "run": run, "extra": extra}


# ---------------------------------------------------------------------------------------------
# files

def read_result_json(path: str | Path) -> dict:
    """The JSON object stored at `path`, without any schema check.

    Raises DataError when the file is missing, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: result file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read result file ({err})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                        f"{err.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {_type_name(obj)}")
    return obj


def check_schema_version(obj: dict, path: str | Path) -> None:
    """Raise DataError (one line) unless `obj` declares the schema version this code reads."""
    version = obj.get("schema_version")
    if version is None:
        raise DataError(f"{path}: not a totobench result file (no schema_version field)")
    if version != RESULT_SCHEMA_VERSION:
        raise DataError(f"{path}: result schema_version {version!r} is not supported "
                        f"(this totobench reads schema_version {RESULT_SCHEMA_VERSION!r})")


def check_result(obj: dict, path: str | Path) -> dict:
    """Raise DataError (one line naming `path`) unless `obj` is a valid result of this schema
    version: the version first, then `validate_result` (first problem shown, with the count of
    the others). Returns `obj`."""
    check_schema_version(obj, path)
    problems = validate_result(obj)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{path}: invalid result file: {problems[0]}{more}")
    return obj


def load_result(path: str | Path) -> dict:
    """Read and validate one result file.

    Raises DataError (one line naming the file) when the file is missing or not JSON, declares a
    schema_version other than RESULT_SCHEMA_VERSION, or fails `validate_result`.
    """
    return check_result(read_result_json(path), path)


def _to_json(value):
    # numpy / torch scalars reach here from the probes; anything else is a bug worth seeing
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_result_atomic(path: str | Path, obj: dict) -> Path:
    """Validate `obj` and write it as JSON (indented, no NaN) to `path` with `io.atomic_write`.

    Numpy/torch scalars are written as plain numbers. Nothing is written, and an existing file
    at `path` is left as it was, when validation, serialisation or the write fails.
    Returns `path`. Raises DataError when `obj` is not a valid result (first problem shown).
    """
    problems = validate_result(obj)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{path}: refusing to write an invalid result: {problems[0]}{more}")
    text = json.dumps(obj, indent=2, allow_nan=False, default=_to_json) + "\n"
    return atomic_write(path, text)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: str) -> str:
    """A file-system-safe form of a model or task name ("random-init:toto-tiny" -> "random-init_toto-tiny").

    Every run of characters other than letters, digits and `._+-` becomes one "_"; a name that
    would be empty or only dots (".", "..") gets a leading "_".
    """
    safe = _UNSAFE.sub("_", name).strip("_") or "_"
    if set(safe) == {"."}:
        safe = "_" + safe
    return safe



def result_path(out_dir: str | Path, model_name: str, task_name: str) -> Path:
    """Where the result of `model_name` on `task_name` lives: out_dir/<model>/<task>.json."""
    return Path(out_dir) / safe_name(model_name) / f"{safe_name(task_name)}.json"
