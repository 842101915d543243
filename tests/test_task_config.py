"""Task YAML loading: include merging, validation errors, --set overrides, task lookup."""

import pytest

from totobench.errors import ConfigError
from totobench.tasks.config import (apply_overrides, load_task_config, load_yaml_with_includes,
                                    resolve_task_names, validate_task_config)


def write(path, text):
    path.write_text(text)
    return path


def test_include_merges_nested_sections_and_child_wins(tmp_path):
    write(tmp_path / "_base.yaml", "class: classification\ndataset: {format: imagenet, train_split: train}\n"
                                   "probe: {name: linear, epochs: 5}\nmain_metric: top1\n")
    child = write(tmp_path / "t.yaml", "include: _base.yaml\nprobe: {epochs: 7}\n")
    cfg = load_yaml_with_includes(child)
    assert cfg["probe"] == {"name": "linear", "epochs": 7}
    assert cfg["dataset"] == {"format": "imagenet", "train_split": "train"}
    assert "include" not in cfg


def test_include_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_yaml_with_includes(tmp_path / "a.yaml")


def test_unknown_key_names_file_key_and_close_match(tmp_path):
    cfg = {"class": "classification", "main_metric": "top1", "dataset": {"format": "imagenet"},
           "probes": {}}
    with pytest.raises(ConfigError, match=r"t.yaml: unknown key 'probes' \(did you mean 'probe'\?\)"):
        validate_task_config(cfg, tmp_path / "t.yaml")


def test_wrong_type_names_the_nested_key(tmp_path):
    cfg = {"class": "classification", "main_metric": "top1",
           "dataset": {"format": "imagenet"}, "input": {"resolution": "big"}}
    with pytest.raises(ConfigError, match=r"'input.resolution' must be an integer or null, got 'big'"):
        validate_task_config(cfg, tmp_path / "t.yaml")


def test_malformed_yaml_is_one_line_with_line_number(tmp_path):
    bad = write(tmp_path / "bad.yaml", "class: classification\nprobe: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_yaml_with_includes(bad)


def test_overrides_root_by_format_and_by_task():
    cfg = {"dataset": {"format": "imagenet", "root": None}, "probe": {"epochs": 3}}
    out = apply_overrides(cfg, "imagenet-linear", ["imagenet.root=/data/in1k", "probe.epochs=9",
                                                   "k400.root=/data/k400", "imagenet-linear.probe.lrs=[0.1]"])
    assert out["dataset"]["root"] == "/data/in1k"
    assert out["probe"] == {"epochs": 9, "lrs": [0.1]}


def test_bundled_tasks_load_and_unknown_names_suggest():
    cfg = load_task_config("imagenet-linear")
    assert cfg["probe"]["name"] == "linear" and cfg["dataset"]["format"] == "imagenet"
    with pytest.raises(ConfigError, match="unknown task 'imagnet'; did you mean imagenet"):
        resolve_task_names("imagnet")
