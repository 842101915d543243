"""Property tests (issue 23): random values into the layer parser, the `--set` path (parser and
typed task config) and the checkpoint-config loader. Every failure must be the suite's own error
type with a one-line message - never another exception - and every success a valid value."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from totobench.errors import TotobenchError
from totobench.model.checkpoint import read_config
from totobench.model.config import PRESETS, TotoConfig
from totobench.runner import parse_layers
from totobench.tasks.config import load_task_config, parse_override

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


def _one_line(err: Exception) -> None:
    assert isinstance(err, TotobenchError), repr(err)
    assert str(err) and "\n" not in str(err), repr(str(err))


layer_parts = st.one_of(st.integers(-20, 20), st.just(""), st.text(max_size=2))
layer_text = st.one_of(st.text(max_size=12), st.just("all"),
                       st.lists(layer_parts, min_size=1, max_size=4).map(lambda xs: ":".join(map(str, xs))),
                       st.lists(layer_parts, min_size=1, max_size=4).map(lambda xs: ",".join(map(str, xs))))


@SETTINGS
@given(spec=layer_text, num_layers=st.integers(1, 24))
def test_layer_parser_gives_valid_layers_or_one_line(spec, num_layers):
    try:
        layers = parse_layers(spec, num_layers)
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions escape
        _one_line(err)
        return
    assert layers and layers == sorted(set(layers)) and all(0 <= i < num_layers for i in layers)


set_keys = st.sampled_from(["probe.epochs", "probe.lrs", "probe.wds", "probe.whiten", "probe.name", "probe.pooling",
                            "input.resolution", "input.frames", "input.segments", "quick.max_train_per_class",
                            "dataset.root", "dataset.train_split", "metrics", "main_metric", "seed", "batch_size",
                            "probe", "input", "k400.probe.positions", "imagenet-linear.probe.lrs", "probe.nope"])
set_values = st.one_of(st.text(max_size=10), json_values.map(json.dumps))


@SETTINGS
@given(task=st.sampled_from(["imagenet-linear", "k400", "davis", "ego4d-sta", "robot"]),
       overrides=st.lists(st.one_of(st.text(max_size=20), st.tuples(set_keys, set_values).map("=".join)), max_size=3))
def test_set_overrides_give_a_typed_config_or_one_line(task, overrides):
    try:
        for text in overrides:
            parse_override(text)
        cfg = load_task_config(task, overrides)
    except Exception as err:  # noqa: BLE001
        _one_line(err)
        return
    assert cfg.name == task and cfg.probe.name and cfg.probe == type(cfg.probe).from_mapping(cfg.probe.as_dict(), "x")


config_fields = list(PRESETS["toto-tiny"]) + ["architecture"]


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(config_fields), json_values, max_size=3),
       drop=st.lists(st.sampled_from(config_fields), max_size=2), raw=st.one_of(st.none(), st.text(max_size=30)))
def test_checkpoint_config_loader_gives_a_config_or_one_line(tmp_path_factory, changes, drop, raw):
    folder = tmp_path_factory.mktemp("cfg")
    config = {"architecture": "toto", **PRESETS["toto-tiny"], **changes}
    for key in drop:
        config.pop(key, None)
    (folder / "config.json").write_text(raw if raw is not None else json.dumps(config))
    try:
        loaded = read_config(folder)
    except Exception as err:  # noqa: BLE001
        _one_line(err)
        return
    assert isinstance(loaded, TotoConfig) and loaded.dim % loaded.n_heads == 0
