"""The one registry: lazy entries, base-class checks, one "did you mean"; every entry honours its contract."""

import sys

import pytest

from totobench.errors import ConfigError
from totobench.probes.base import Probe, ProbeSpec
from totobench.registry import MODELS, PROBES, TASKS, Registry, did_you_mean
from totobench.tasks.base import Task


def test_did_you_mean_picks_the_closest_name_or_lists_them():
    assert did_you_mean("lineer", ["linear", "knn"]) == "; did you mean 'linear'?"
    assert did_you_mean("zzz", ["b", "a"]) == "; known: a, b"


def test_entries_are_imported_only_when_asked_for(tmp_path, monkeypatch):
    (tmp_path / "lazy_entry_mod.py").write_text("from totobench.probes.base import Probe\nclass P(Probe):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("probe", base="totobench.probes.base:Probe")
    reg.register("p", "lazy_entry_mod:P", "a probe")
    assert "lazy_entry_mod" not in sys.modules and reg.names() == ["p"]
    assert reg.get("p").__name__ == "P" and "lazy_entry_mod" in sys.modules
    with pytest.raises(ConfigError, match=r"unknown probe 'q'; known: p"):
        reg.get("q")


def test_an_entry_that_is_not_of_the_base_class_is_refused(tmp_path, monkeypatch):
    (tmp_path / "not_a_task_mod.py").write_text("class NotATask:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="not a subclass of totobench.tasks.base:Task"):
        TASKS.get("not_a_task_mod:NotATask")
    with pytest.raises(ConfigError, match="cannot be imported"):
        TASKS.get("no_such_module_xyz:Task")


def test_every_registered_task_and_probe_honours_its_contract():
    for name in TASKS.names():
        cls = TASKS.get(name)
        assert issubclass(cls, Task) and cls.kind == name and TASKS.description(name)
        assert any(PROBES.get(p).produces == cls.consumes for p in PROBES.names())
        assert PROBES.get(cls.default_probe).produces == cls.consumes
    for name in PROBES.names():
        cls = PROBES.get(name)
        assert issubclass(cls, Probe) and issubclass(cls.Spec, ProbeSpec) and PROBES.description(name)
        assert cls.Spec().name == name   # the spec's default name is the registered one
    assert set(MODELS.names()) >= {"checkpoint", "random-init"}
