"""Layer specs and the feature cache's integrity checks."""

import hashlib
import json

import numpy as np
import pytest

from totobench.errors import ConfigError
from totobench.features.cache import FeatureCache, cache_key
from totobench.runner import parse_layers


@pytest.mark.parametrize("spec,expected", [
    ("all", [0, 1, 2, 3, 4, 5, 6, 7]), ("0,4,-1", [0, 4, 7]), ("2:8:2", [2, 4, 6]),
    ("::3", [0, 3, 6]), ("-2,-1,-1", [6, 7]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 8) == expected


@pytest.mark.parametrize("spec", ["8", "-9", "a,b", ""])
def test_parse_layers_rejects(spec):
    with pytest.raises(ConfigError):
        parse_layers(spec, 8)


def test_cache_roundtrip_and_truncated_shard_is_a_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    key = cache_key(checkpoint="abc", layer=3, pooling="mean")
    values = np.arange(40, dtype=np.float16).reshape(10, 4)
    w = cache.writer(key, values.shape)
    w.write(0, values[:6])
    w.write(6, values[6:])
    w.commit()
    np.testing.assert_array_equal(cache.load(key), values)
    path = cache.path(key)
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # truncate: must be detected, never read
    assert cache.load(key) is None
    path.write_bytes(data[:-8] + b"\x00" * 8)  # same size, corrupt bytes
    assert cache.load(key) is None


def test_cache_key_changes_with_every_part():
    base = dict(checkpoint="a", layer=1, pooling="mean", transform="t", dataset="d")
    keys = {cache_key(**base)}
    for k in base:
        keys.add(cache_key(**{**base, k: "other"}))
    assert len(keys) == len(base) + 1


def test_cache_key_and_entry_format_are_those_of_existing_caches(tmp_path):
    """Keys and files written before stay hits: a changed key or record format would silently
    recompute every user's features."""
    key = cache_key(checkpoint="abc", layer=3, pooling="mean", dataset="d", chunk="0:8")
    assert key == "46adc4e418a06ba763e54f94adac3619"
    values = np.arange(12, dtype=np.float16).reshape(3, 4)
    np.save(tmp_path / f"{key}.npy", values)   # an entry as an earlier totobench wrote it
    shard = (tmp_path / f"{key}.npy").read_bytes()
    record = {"shape": [3, 4], "dtype": "float16", "sha256": hashlib.sha256(shard).hexdigest(), "bytes": len(shard)}
    (tmp_path / f"{key}.json").write_text(json.dumps(record))
    np.testing.assert_array_equal(FeatureCache(tmp_path).load(key), values)
    FeatureCache(tmp_path / "new").writer(key, values.shape).commit()
    assert json.loads((tmp_path / "new" / f"{key}.json").read_text()).keys() == record.keys()


def test_aborted_writer_leaves_nothing(tmp_path):
    cache = FeatureCache(tmp_path)
    w = cache.writer("k", (4, 2))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_of_a_key_keeps_the_committed_entry_a_reader_may_have_mapped(tmp_path):
    cache = FeatureCache(tmp_path)
    first, second = cache.writer("k", (4, 2)), cache.writer("k", (4, 2))   # two processes, one chunk
    first.write(0, np.ones((4, 2), np.float16))
    second.write(0, np.full((4, 2), 2, np.float16))                         # e.g. other float rounding
    mapped = first.commit()
    np.testing.assert_array_equal(second.commit(), mapped)                  # the first one's entry
    np.testing.assert_array_equal(cache.load("k"), np.ones((4, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:-4])          # a corrupt entry is replaced
    third = cache.writer("k", (4, 2))
    third.write(0, np.full((4, 2), 3, np.float16))
    third.commit()
    np.testing.assert_array_equal(cache.load("k"), np.full((4, 2), 3))
