"""ensure_data_world: generates once under data_home(), regenerates only what is missing."""

from __future__ import annotations

import shutil

import pytest

from totobench.data.world import ensure_data_world
from totobench.errors import ConfigError


def test_generates_once_then_only_missing_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path))
    world = ensure_data_world("tiny", seed=2)
    assert world == tmp_path / "data" / "world-tiny-seed2"
    roots = sorted(p.name for p in world.iterdir() if p.is_dir())
    assert roots == ["davis", "ego4d", "imagenet", "kinetics400", "pretrain"]
    assert len(list((world / "pretrain" / "images").glob("*.JPEG"))) == 16
    assert len(list((world / "pretrain" / "videos").glob("*.mp4"))) == 6

    stamp = (world / "imagenet" / "LOC_synset_mapping.txt").stat().st_mtime_ns
    davis_files = sorted(p.relative_to(world) for p in (world / "davis").rglob("*"))
    shutil.rmtree(world / "davis")
    assert ensure_data_world("tiny", seed=2) == world
    assert (world / "imagenet" / "LOC_synset_mapping.txt").stat().st_mtime_ns == stamp  # untouched
    assert sorted(p.relative_to(world) for p in (world / "davis").rglob("*")) == davis_files  # rebuilt
    assert not [p for p in world.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unknown_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="size"):
        ensure_data_world("giant")
