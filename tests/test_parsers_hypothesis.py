"""Property tests: the task-YAML parser and the annotation parsers, on arbitrary input, either
return a result or raise the one-line user error of their kind (ConfigError / DataError) -
never another exception (a traceback for the user)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from totobench.data.ego4d import StaAnnotations, load_sta
from totobench.data.kinetics import read_kinetics_csv
from totobench.errors import ConfigError, DataError
import dataclasses

from totobench.registry import PROBES, TASKS
from totobench.tasks.config import TOP_LEVEL_KEYS, apply_overrides, build_task_config, load_yaml_with_includes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-like values; keys drawn partly from the real schema so validation goes past the first key
SPECS = [spec for name in TASKS.names() for spec in (TASKS.get(name).Dataset, TASKS.get(name).Input,
                                                      TASKS.get(name).Quick)] + [PROBES.get(n).Spec for n in PROBES.names()]
PROBE_KEYS = sorted({f.name for n in PROBES.names() for f in dataclasses.fields(PROBES.get(n).Spec)} - {"name"})
KEYS = sorted({*TOP_LEVEL_KEYS, *(f.name for spec in SPECS for f in dataclasses.fields(spec))})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=12)
mappings = st.dictionaries(keys, values, max_size=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parsers")


def _write(folder: Path, name: str, data: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      mappings.map(lambda m: yaml.safe_dump(m, allow_unicode=True))))
def test_task_yaml_reader_raises_only_config_error(folder, text):
    path = _write(folder, "task.yaml", text)
    try:
        assert isinstance(load_yaml_with_includes(path), dict)
    except ConfigError:
        pass


@SETTINGS
@given(include=st.one_of(values, st.sampled_from(["", ".", "_part.yaml", "x" * 300, "a\x00b"])), body=mappings)
def test_includes_of_any_shape_raise_only_config_error(folder, include, body):
    _write(folder, "_part.yaml", yaml.safe_dump(body))
    path = _write(folder, "top.yaml", yaml.safe_dump({"include": include, "main_metric": "top1"}))
    try:
        assert isinstance(load_yaml_with_includes(path), dict)
    except ConfigError:
        pass


@SETTINGS
@given(cfg=st.one_of(mappings, st.fixed_dictionaries(
    {"class": st.sampled_from(TASKS.names() + ["nope", "x:y"]), "main_metric": st.sampled_from(["top1", "success"]),
     "dataset": st.one_of(mappings, st.fixed_dictionaries({"format": st.just("imagenet")}))},
    optional={"probe": st.one_of(mappings, st.fixed_dictionaries({"name": st.sampled_from(PROBES.names())},
                                                                 optional={k: values for k in PROBE_KEYS})),
              "input": mappings, "quick": mappings, "metrics": values, "seed": values})))
def test_build_task_config_raises_only_config_error(cfg):
    try:
        build_task_config("t", cfg, Path("task.yaml"))
    except ConfigError:
        pass


@SETTINGS
@given(cfg=st.one_of(mappings, st.fixed_dictionaries({"dataset": values}, optional={"probe": values})),
       task=st.sampled_from(["imagenet", "mine", ""]),
       overrides=st.lists(st.one_of(st.text(max_size=30), st.tuples(
           st.sampled_from(["dataset.root", "probe.epochs", "imagenet.root", "k400.root", "mine.seed",
                            "a..b", "."]), st.text(max_size=10)).map("=".join)), max_size=4))
def test_apply_overrides_raises_only_config_error(cfg, task, overrides):
    try:
        assert isinstance(apply_overrides(cfg, task, overrides)[0], dict)
    except ConfigError:
        pass


# STA annotation files: arbitrary JSON, and files close to the real layout with any field broken
objects = st.fixed_dictionaries({}, optional={"box": values, "noun_category_id": values,
                                              "verb_category_id": values, "time_to_contact": values})
annotations = st.one_of(values, st.fixed_dictionaries(
    {"uid": st.one_of(st.text(string.ascii_letters, min_size=1, max_size=5), values)},
    optional={"video_uid": values, "frame": values, "objects": st.one_of(values, st.lists(objects, max_size=3))}))
sta_files = st.one_of(
    values,
    st.fixed_dictionaries({"annotations": st.one_of(values, st.lists(annotations, max_size=4))},
                          optional={"info": st.one_of(values, st.fixed_dictionaries({}, optional={
                              "noun_categories": values, "verb_categories": values, "video_metadata": values}))}),
)


@SETTINGS
@given(data=sta_files, strict=st.booleans())
def test_load_sta_raises_only_data_error(folder, data, strict):
    path = _write(folder, "fho_sta_val.json", json.dumps(data))
    try:
        assert isinstance(load_sta(path, strict=strict), StaAnnotations)
    except DataError:
        pass


@SETTINGS
@given(raw=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_load_sta_on_any_bytes_raises_only_data_error(folder, raw):
    path = _write(folder, "fho_sta_train.json", raw)
    try:
        load_sta(path)
    except DataError:
        pass


cells = st.one_of(st.text(max_size=8), st.sampled_from(["", "1", "2.5", "-3", "1e400", "nan", "inf", "x"]))
csv_rows = st.lists(st.lists(cells, max_size=6).map(",".join), max_size=6)


@SETTINGS
@given(header=st.one_of(st.just("label,youtube_id,time_start,time_end,split"), st.text(max_size=40)),
       rows=csv_rows, tail=st.one_of(st.just(""), st.text(max_size=30), st.binary(max_size=30)))
def test_read_kinetics_csv_raises_only_data_error(folder, header, rows, tail):
    body = "\n".join([header, *rows]).encode("utf-8", "surrogatepass")
    tail = tail if isinstance(tail, bytes) else tail.encode("utf-8", "surrogatepass")
    path = _write(folder, "val.csv", body + tail)
    try:
        rows_out, bad = read_kinetics_csv(path)
        assert isinstance(rows_out, list) and isinstance(bad, list)
    except DataError:
        pass
