"""The generated data world under `data_home()`, made on first use.

    world = ensure_data_world()              # data_home()/world-default-seed0
    imagenet_root = world / "imagenet"       # also kinetics400/, ego4d/, davis/, pretrain/
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from totobench.data.synth import SIZES, missing_roots, synth
from totobench.errors import ConfigError
from totobench.paths import data_home


def world_dir(size: str = "default", seed: int = 0) -> Path:
    return data_home() / f"world-{size}-seed{seed}"


def ensure_data_world(size: str = "default", seed: int = 0) -> Path:
    """Path of the data world for (size, seed), generating whatever part of it is missing.

    Each root (imagenet/, kinetics400/, ego4d/, davis/, pretrain/) is written to a temporary folder
    and renamed into place, so a root that exists is complete. A lock file serialises processes
    that race for the same world: the second one waits, then finds the roots present.
    Raises ConfigError for an unknown size or a negative seed.
    """
    if size not in SIZES:
        raise ConfigError(f"data world size {size!r} is unknown; expected one of {sorted(SIZES)}")
    world = world_dir(size, seed)
    if world.is_dir() and not missing_roots(world, seed, size):
        return world
    world.parent.mkdir(parents=True, exist_ok=True)
    with open(world.parent / f".{world.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        synth(world, seed=seed, size=size)  # writes only the roots still missing
    return world
