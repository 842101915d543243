"""Task YAML loading: include merging, typed sections, --set overrides, errors before any work."""

import pytest

from totobench.cli import main
from totobench.errors import ConfigError
from totobench.tasks.config import (apply_overrides, build_task_config, load_task_config,
                                    load_yaml_with_includes, resolve_task_names)

BASE = {"class": "classification", "main_metric": "top1", "dataset": {"format": "imagenet"}}


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
    spec = build_task_config("t", cfg, child).probe
    assert (spec.name, spec.epochs, spec.lrs) == ("linear", 7, (0.1, 0.03, 0.01, 0.003, 0.001))


def test_include_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_yaml_with_includes(tmp_path / "a.yaml")


def test_unknown_top_level_key_names_file_key_and_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"t.yaml: unknown key 'probes'; did you mean 'probe'\?"):
        build_task_config("t", {**BASE, "probes": {}}, tmp_path / "t.yaml")


def test_wrong_type_names_the_section_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"t.yaml: input.resolution: expected an integer or null, got 'big'"):
        build_task_config("t", {**BASE, "input": {"resolution": "big"}}, tmp_path / "t.yaml")


@pytest.mark.parametrize("probe, message", [
    ({"name": "linear", "lrz": 0.1}, r"probe: unknown key 'lrz'; did you mean 'lrs'\?"),
    ({"name": "linear", "epochs": "ten"}, r"probe.epochs: expected an integer, got 'ten'"),
    ({"name": "linear", "epochs": 0}, r"probe.epochs: expected >= 1, got 0"),
    ({"name": "linear", "lrs": 0.1}, r"probe.lrs: expected a list of finite numbers, got 0.1"),
    ({"name": "linear", "wds": [float("nan")]}, r"probe.wds: expected a list of finite numbers, got \[nan\]"),
    ({"name": "knn", "temperature": "inf"}, r"probe.temperature: expected a finite number, got 'inf'"),
    ({"name": "linear", "lrs": []}, r"probe.lrs: expected a non-empty list, got \[\]"),
    ({"name": "attentive", "positions": "time"}, r"probe.positions: expected one of 'none', 'spacetime', got 'time'"),
    ({"name": "attentive", "positions": "spacetime", "pooling": "mean", "head": "mha"}, r"'spacetime' needs every token"),
    ({"name": "attentive", "positions": "spacetime"}, r"positions"),
    ({"name": "linear", "pooling": "max"}, r"probe.pooling: expected mean, tokens"),
    ({"name": "lineer"}, r"probe.name: unknown probe 'lineer'; did you mean 'linear'\?"),
    ({"name": "label_propagation"}, r"'label_propagation' gives soft masks, but task class 'classification' "
                                    r"scores class scores \(probes that fit: attentive, knn, linear\)"),
])
def test_probe_section_is_typed_by_its_spec(tmp_path, probe, message):
    with pytest.raises(ConfigError, match=message):
        build_task_config("t", {**BASE, "probe": probe}, tmp_path / "t.yaml")


def test_metrics_must_be_the_task_kinds_and_include_the_main_metric(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics: 'top2' is not a metric of task class classification; "
                                          r"did you mean 'top5'"):
        build_task_config("t", {**BASE, "metrics": ["top1", "top2"]}, tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="main_metric 'top1' must be one of the reported metrics"):
        build_task_config("t", {**BASE, "metrics": ["top5"]}, tmp_path / "t.yaml")
    robot = load_task_config("robot")
    assert robot.metrics == ("success", "success_se", "success/*")


def test_overrides_root_by_format_and_by_task_and_remember_their_source():
    cfg = {"dataset": {"format": "imagenet", "root": None}, "probe": {"epochs": 3}}
    out, sources = apply_overrides(cfg, "imagenet-linear", ["imagenet.root=/data/in1k", "probe.epochs=9",
                                                            "k400.root=/data/k400", "imagenet-linear.probe.lrs=[0.1]"])
    assert out["dataset"]["root"] == "/data/in1k"
    assert out["probe"] == {"epochs": 9, "lrs": [0.1]}
    assert sources[("probe", "lrs")] == "--set imagenet-linear.probe.lrs=[0.1]"


def test_set_errors_name_the_flag_and_the_key():
    with pytest.raises(ConfigError, match=r"^--set imagenet.probe.lrz=0.1: .*imagenet.yaml: probe: unknown key "
                                          r"'lrz'; did you mean 'lrs'\?$"):
        load_task_config("imagenet", ["imagenet.probe.lrz=0.1"])
    with pytest.raises(ConfigError, match=r"^--set imagenet.probe.epochs=ten: .*probe.epochs: expected an integer, "
                                          r"got 'ten'$"):
        load_task_config("imagenet", ["imagenet.probe.epochs=ten"])


@pytest.mark.parametrize("setting, message", [
    ("imagenet.probe.lrz=0.1", "unknown key 'lrz'; did you mean 'lrs'?"),
    ("imagenet.probe.epochs=ten", "probe.epochs: expected an integer, got 'ten'"),
])
def test_bad_probe_setting_fails_before_the_model_loads_or_features_are_extracted(
        tmp_path, monkeypatch, capsys, setting, message):
    import totobench.model
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(totobench.model, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["run", "--model", "toto-tiny", "--tasks", "imagenet", "--out", str(tmp_path / "out"),
                 "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("totobench: error: --set")
    assert not (tmp_path / "home").exists() and not (tmp_path / "out" / "toto-tiny").exists()


def test_malformed_yaml_is_one_line_with_line_number(tmp_path):
    bad = write(tmp_path / "bad.yaml", "class: classification\nprobe: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_yaml_with_includes(bad)


def test_bundled_tasks_load_with_their_defaults_and_unknown_names_suggest():
    cfg = load_task_config("imagenet-linear")
    assert cfg.probe.name == "linear" and cfg.dataset.format == "imagenet"
    k400 = load_task_config("k400")
    assert (k400.input.segments, k400.input.views, k400.input.train_clips_per_video) == (1, 3, 1)
    assert k400.probe.epochs == 20 and (k400.probe.head, k400.probe.pooling, k400.probe.positions) == ("aim", "tokens", "none")
    spacetime = load_task_config("k400-spacetime").probe
    assert (spacetime.head, spacetime.pooling, spacetime.positions) == ("mha", "tokens_pool2", "spacetime")
    single = load_task_config("k400-single-frame")
    assert single.probe == k400.probe and (single.input.frames, single.input.stride) == (1, 1)
    with pytest.raises(ConfigError, match="unknown task 'imagnet'; did you mean 'imagenet'"):
        resolve_task_names("imagnet")
