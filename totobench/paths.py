"""Where totobench keeps generated data and caches at run time."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def totobench_home() -> Path:
    """`$TOTOBENCH_HOME`, default `~/.cache/totobench`."""
    return Path(os.environ.get("TOTOBENCH_HOME", Path.home() / ".cache" / "totobench")).expanduser()


def data_home() -> Path:
    return totobench_home() / "data"


def cache_home() -> Path:
    return totobench_home() / "features"


def tasks_dir() -> Path:
    """Folder of the bundled task YAML files."""
    return REPO_ROOT / "tasks"


def checkpoints_dir() -> Path:
    return REPO_ROOT / "checkpoints"
