"""Result files carry no path of the machine that wrote them (part of issue 22)."""

import json
from pathlib import Path

from totobench.paths import REPO_ROOT, portable_path


def test_paths_are_written_relative_to_the_repository_the_totobench_home_or_the_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "tb"))
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert portable_path(REPO_ROOT / "checkpoints" / "toto-tiny") == "checkpoints/toto-tiny"
    assert portable_path(tmp_path / "tb" / "data" / "davis") == "$TOTOBENCH_HOME/data/davis"
    assert portable_path(tmp_path / "me" / "imagenet") == "~/imagenet"
    assert portable_path("/elsewhere/imagenet") == "/elsewhere/imagenet"


def test_published_results_hold_no_absolute_path_of_this_machine():
    for path in sorted((REPO_ROOT / "results").glob("*/*.json")):
        text = path.read_text()
        for machine_path in (str(REPO_ROOT), str(Path.home())) if len(str(Path.home())) > 1 else (str(REPO_ROOT),):
            assert machine_path not in text, f"{path} holds {machine_path}"
        result = json.loads(text)
        assert result["model"]["path"] in (None, "checkpoints/toto-tiny")
        assert result["task"]["dataset_root"] is None or result["task"]["dataset_root"].startswith("$TOTOBENCH_HOME/")
