"""A short, stable fingerprint of a dataset's files, recorded in every result file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable


def dataset_fingerprint(root: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> str:
    """16 hex digits of sha256 over the sorted (path relative to `root`, size in bytes) pairs.

    Modification times are left out, so a copy of the same files on another machine gives the
    same fingerprint; a missing file counts with size -1 instead of raising.
    """
    root = Path(root)
    entries = []
    for path in paths:
        path = Path(path)
        relative = path.relative_to(root) if path.is_absolute() and path.is_relative_to(root) else path
        try:
            size = (root / relative).stat().st_size
        except OSError:
            size = -1
        entries.append(f"{relative.as_posix()}\t{size}\n")
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8"))
    return digest.hexdigest()[:16]
