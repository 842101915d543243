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


def portable_path(path: str | os.PathLike) -> str:
    """How a path is written into a result file, so that files from two machines compare equal:
    relative to the repository when inside it ("checkpoints/toto-tiny"), "$TOTOBENCH_HOME/..."
    under the totobench home, "~/..." under the user's home, else absolute."""
    path = Path(path).expanduser().absolute()
    for base, shown in ((REPO_ROOT, ""), (totobench_home().absolute(), "$TOTOBENCH_HOME"),
                        (Path.home().absolute(), "~")):
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        return rel.as_posix() if not shown else f"{shown}/{rel.as_posix()}".rstrip("/")
    return str(path)
