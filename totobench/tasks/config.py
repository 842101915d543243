"""Task YAML files: lookup by name, `include:` merging, key/type validation, `--set` overrides.

A task file is small and declarative (lm-eval style): it names the task class (`class:`), the
dataset (`dataset.format`, `dataset.root`), the input (resolution, frames), the probe and its grid,
and the metrics. Shared parts live in files whose name starts with `_` and are pulled in with
`include:` (a path relative to the including file, or a list of them); the including file wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from totobench.errors import ConfigError, shown
from totobench.registry import did_you_mean
from totobench.paths import tasks_dir

# Top-level keys and the type each must have; the sections (dataset, input, probe, quick) are
# typed by the task class and the probe (tasks/base.py, probes/base.py).
TOP_LEVEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "task": str, "class": str, "include": (str, list), "description": str, "reference": str, "dataset": dict,
    "input": dict, "probe": dict, "metrics": list, "main_metric": str, "quick": dict, "seed": int,
    "batch_size": int, "num_workers": int,
}
SECTIONS = ("dataset", "input", "probe", "quick")

# Which folder of a `--data-root` (or of the generated data world) holds each format.
FORMAT_FOLDERS = {"imagenet": "imagenet", "k400": "kinetics400", "ego4d-sta": "ego4d",
                  "davis": "davis", "metaworld": "robot"}


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}.get(t, t.__name__)


def _check_top_level(path: Path, cfg: dict, sources: dict[tuple, str]) -> None:
    for key, value in cfg.items():
        where = f"{sources[(key,)]}: {path}" if (key,) in sources else str(path)
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), TOP_LEVEL_KEYS)}")
        expected = TOP_LEVEL_KEYS[key]
        if (isinstance(value, bool) and expected is int) or not isinstance(value, expected):
            raise ConfigError(f"{where}: '{key}' must be {_type_name(expected)}, got {value!r}")
    for key in ("class", "main_metric"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key '{key}'")
    if not isinstance(cfg.get("dataset"), dict) or "format" not in cfg["dataset"]:
        raise ConfigError(f"{path}: missing key 'dataset.format'")
    if "metrics" in cfg and not all(isinstance(m, str) for m in cfg["metrics"]):
        raise ConfigError(f"{path}: 'metrics' must be a list of metric names, got {cfg['metrics']!r}")


def build_task_config(name: str, cfg: dict, path: Path, sources: dict[tuple, str] | None = None):
    """The typed TaskConfig of a merged YAML mapping; ConfigError (file, key, expectation) otherwise.

    Builds each section with the task class's and the probe's typed specs, so a wrong key or
    value fails here, before any model is loaded or any feature extracted."""
    from totobench.probes.base import Probe
    from totobench.registry import PROBES, TASKS
    from totobench.tasks.base import TaskConfig, check_metrics
    sources = sources or {}
    _check_top_level(path, cfg, sources)
    task_cls = TASKS.get(cfg["class"], where=f"{path}: class")

    def section(key: str) -> tuple[dict, dict[str, str]]:
        data = cfg.get(key) or {}
        return data, {k[1]: v for k, v in sources.items() if len(k) == 2 and k[0] == key}

    probe_section, probe_sources = section("probe")
    probe_name = probe_section.get("name", task_cls.default_probe)
    if not isinstance(probe_name, str):
        raise ConfigError(f"{probe_sources.get('name', path)}: probe.name: expected a probe name, got {probe_name!r}")
    PROBES.check(probe_name, where=f"{probe_sources.get('name', path)}: probe.name")
    probe_cls: type[Probe] = PROBES.get(probe_name)
    if probe_cls.produces != task_cls.consumes:
        fits = [n for n in PROBES.names() if PROBES.get(n).produces == task_cls.consumes]
        raise ConfigError(f"{path}: probe.name {probe_name!r} gives {probe_cls.produces}, but task class "
                          f"{cfg['class']!r} scores {task_cls.consumes} (probes that fit: {', '.join(fits)})")
    specs = {}
    for key, spec_cls in (("dataset", task_cls.Dataset), ("input", task_cls.Input), ("quick", task_cls.Quick),
                          ("probe", probe_cls.Spec)):
        data, key_sources = section(key)
        specs[key] = spec_cls.from_mapping(data, f"{path}: {key}", key_sources)
    config = TaskConfig(name=name, path=str(path), kind=cfg["class"], description=cfg.get("description", ""),
                        reference=cfg.get("reference", ""),
                        metrics=tuple(cfg.get("metrics") or (cfg["main_metric"],)), main_metric=cfg["main_metric"],
                        seed=cfg.get("seed", 0), batch_size=cfg.get("batch_size", 64),
                        num_workers=cfg.get("num_workers", 0), **specs)
    for key in ("batch_size", "num_workers", "seed"):
        if getattr(config, key) < (1 if key == "batch_size" else 0):
            raise ConfigError(f"{path}: '{key}' must be >= {1 if key == 'batch_size' else 0}, got {getattr(config, key)}")
    check_metrics(task_cls, config, str(path))
    return config


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
            raise ConfigError(f"unknown task {name!r}{did_you_mean(name, tasks)} (see `totobench ls tasks`)")
    return names


# `--tasks all` runs the main protocol of each benchmark (the paper's table), not every variant.
DEFAULT_SUITE = ("imagenet", "k400", "ego4d-sta", "davis", "robot")


def _default_suite(tasks: dict[str, Path]) -> list[str]:
    return [name for name in DEFAULT_SUITE if name in tasks]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {shown(text)}: expected KEY=VALUE, e.g. --set probe.epochs=5")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {shown(text)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(cfg: dict, task_name: str, overrides: list[str]) -> tuple[dict, dict[tuple, str]]:
    """Apply `--set` overrides to one task's config; also returns {key path: "--set TEXT"} of the
    keys they set (so an error names the flag that caused it).

    `TASK.x.y=v` applies to that task only; `FORMAT.root=v` (e.g. `imagenet.root=/data/in1k`,
    `k400.root=...`) sets the dataset root of every task reading that format; anything else is a
    dotted path into every task's config.
    """
    cfg = dict(cfg)
    sources: dict[tuple, str] = {}
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
        sources[tuple(parts[:2])] = f"--set {shown(text)}"
    return cfg, sources


def _is_task_name(name: str) -> bool:
    return name in available_tasks()


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_task_config(name: str, overrides: list[str] = ()):
    """The typed, validated TaskConfig of task `name`, with `--set` overrides applied."""
    tasks = available_tasks()
    if name not in tasks:
        resolve_task_names(name)  # raises with close matches
    path = tasks[name]
    cfg = load_yaml_with_includes(path)
    cfg.setdefault("task", name)
    cfg, sources = apply_overrides(cfg, name, list(overrides))
    return build_task_config(name, cfg, path, sources)
