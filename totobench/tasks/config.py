"""Task YAML files: lookup by name, `include:` merging, key/type validation, `--set` overrides.

A task file is small and declarative (lm-eval style): it names the task class (`class:`), the
dataset (`dataset.format`, `dataset.root`), the input (resolution, frames), the probe and its grid,
and the metrics. Shared parts live in files whose name starts with `_` and are pulled in with
`include:` (a path relative to the including file, or a list of them); the including file wins.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from totobench.errors import ConfigError
from totobench.paths import tasks_dir

# Top-level keys and the type each must have. Nested sections are free-form mappings whose
# contents the task class checks (each class knows its own probe options).
TOP_LEVEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "class": str,
    "include": (str, list),
    "description": str,
    "dataset": dict,
    "input": dict,
    "probe": dict,
    "metrics": list,
    "main_metric": str,
    "quick": dict,
    "seed": int,
    "batch_size": int,
    "num_workers": int,
}
DATASET_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str, "root": (str, type(None)), "train_split": str, "val_split": str,
    "resolution_folder": (str, type(None)), "env": (str, list), "annotations": dict,
    "demos": int, "rollouts": int, "episode_length": int, "action_repeat": int, "camera": str,
}
INPUT_KEYS: dict[str, type | tuple[type, ...]] = {
    "resolution": (int, type(None)), "frames": (int, type(None)), "stride": (int, type(None)),
    "kind": str, "clips_per_video": int, "crops_per_clip": int, "context_frames": int,
    "keep_aspect": bool, "tile": bool, "scale": (int, float),
}
QUICK_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_train_per_class": int, "max_val_per_class": int, "max_train": int, "max_val": int,
    "max_sequences": int, "epochs": int, "episodes": int, "demos": int, "rollouts": int,
    "episode_length": int,
}

# Which folder of a `--data-root` (or of the generated data world) holds each format.
FORMAT_FOLDERS = {"imagenet": "imagenet", "k400": "kinetics400", "ego4d-sta": "ego4d",
                  "davis": "davis", "metaworld": "robot"}


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {str: "a string", int: "an integer", float: "a number", list: "a list",
            dict: "a mapping", bool: "true/false", type(None): "null"}.get(t, t.__name__)


def _check_section(path: Path, section: str, data: dict, spec: dict) -> None:
    for key, value in data.items():
        where = f"{section}.{key}" if section else key
        if key not in spec:
            close = difflib.get_close_matches(key, spec, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(spec)})"
            raise ConfigError(f"{path}: unknown key '{where}'{hint}")
        expected = spec[key]
        # YAML integers are fine where a number is expected; bools are not integers here.
        if isinstance(value, bool) and expected is int:
            raise ConfigError(f"{path}: '{where}' must be {_type_name(expected)}, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: '{where}' must be {_type_name(expected)}, got {value!r}")


def validate_task_config(cfg: dict, path: Path) -> None:
    """Raise ConfigError naming the file and key when `cfg` has an unknown key or a wrong type."""
    _check_section(path, "", cfg, TOP_LEVEL_KEYS)
    for section, spec in (("dataset", DATASET_KEYS), ("input", INPUT_KEYS), ("quick", QUICK_KEYS)):
        if section in cfg:
            _check_section(path, section, cfg[section], spec)
    for key in ("class", "main_metric"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key '{key}'")
    if "format" not in cfg.get("dataset", {}):
        raise ConfigError(f"{path}: missing key 'dataset.format'")


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: `override` on top of `base`, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML file") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_yaml_with_includes(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read one task YAML and everything it includes, merged (including file wins)."""
    try:
        path = path.resolve()
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path!s:.200}: not a usable file name ({err})") from None
    if path in _seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(p.name for p in _seen + (path,))})")
    data = _read_yaml(path)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'include' must be a file name or a list of file names")
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_with_includes(path.parent / inc, _seen + (path,)))
    return deep_merge(merged, data)


def task_search_dirs() -> list[Path]:
    """Bundled `tasks/` plus any folders in $TOTOBENCH_TASKS (os.pathsep-separated), user's first."""
    extra = [Path(p) for p in os.environ.get("TOTOBENCH_TASKS", "").split(os.pathsep) if p]
    return extra + [tasks_dir()]


def available_tasks() -> dict[str, Path]:
    """Task name -> YAML path, for every task file (files starting with `_` are includes)."""
    found: dict[str, Path] = {}
    for folder in reversed(task_search_dirs()):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if not path.name.startswith("_"):
                    found[path.stem] = path
    return dict(sorted(found.items()))


def resolve_task_names(spec: str) -> list[str]:
    """`all` or a comma-separated list -> task names; unknown names raise with close matches."""
    tasks = available_tasks()
    if spec.strip() == "all":
        return _default_suite(tasks)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--tasks: expected `all` or a comma-separated list of task names")
    for name in names:
        if name not in tasks:
            close = difflib.get_close_matches(name, tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `totobench ls tasks`"
            raise ConfigError(f"unknown task '{name}'{hint}")
    return names


# `--tasks all` runs the main protocol of each benchmark (the paper's table), not every variant.
DEFAULT_SUITE = ("imagenet", "k400", "ego4d-sta", "davis", "robot")


def _default_suite(tasks: dict[str, Path]) -> list[str]:
    return [name for name in DEFAULT_SUITE if name in tasks]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set probe.epochs=5")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(cfg: dict, task_name: str, overrides: list[str]) -> dict:
    """Apply `--set` overrides to one task's config.

    `TASK.x.y=v` applies to that task only; `FORMAT.root=v` (e.g. `imagenet.root=/data/in1k`,
    `k400.root=...`) sets the dataset root of every task reading that format; anything else is a
    dotted path into every task's config.
    """
    cfg = dict(cfg)
    dataset = cfg.get("dataset")
    fmt = dataset.get("format") if isinstance(dataset, dict) else None
    for text in overrides:
        parts, value = parse_override(text)
        head = parts[0]
        if (head in FORMAT_FOLDERS or head in FORMAT_FOLDERS.values()) and parts[1:] == ["root"]:
            if head != fmt and head != FORMAT_FOLDERS.get(fmt):
                continue  # the root of another format
            parts = ["dataset", "root"]
        elif head == task_name and len(parts) > 1:
            parts = parts[1:]
        elif _is_task_name(head) and len(parts) > 1:
            continue  # meant for another task
        cfg = deep_merge(cfg, _nest(parts, value))
    return cfg


def _is_task_name(name: str) -> bool:
    return name in available_tasks()


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_task_config(name: str, overrides: list[str] = ()) -> dict:
    """The merged, validated config of task `name`, with `--set` overrides applied."""
    tasks = available_tasks()
    if name not in tasks:
        resolve_task_names(name)  # raises with close matches
    path = tasks[name]
    cfg = load_yaml_with_includes(path)
    cfg.setdefault("task", name)
    cfg = apply_overrides(cfg, name, list(overrides))
    validate_task_config(cfg, path)
    cfg["_path"] = str(path)
    return cfg
