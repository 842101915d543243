"""docs/adding-a-task.md, followed to the letter: its toy task kind (the module and the YAML in the
document) runs through `totobench run` like a bundled task and its probe really learns."""

import json
import re
from pathlib import Path

from totobench.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-task.md"


def blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_documented_toy_task_kind_runs_end_to_end(tmp_path, monkeypatch, capsys):
    text = DOC.read_text()
    section = text[text.index("The recipe, followed for a toy task kind"):text.index("## 3. A new probe")]
    (module,), (task_yaml,) = blocks("python", section), blocks("yaml", section)
    (tmp_path / "toy_colours.py").write_text(module)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "colours.yaml").write_text(task_yaml)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TOTOBENCH_TASKS", str(tmp_path / "tasks"))
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    out = tmp_path / "results"
    code = main(["run", "--model", "toto-tiny", "--tasks", "colours", "--layers", "0,-1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "toto-tiny" / "colours.json").read_text())
    assert [r["layer"] for r in result["per_layer"]] == [0, 7]
    assert result["task"]["kind"] == "toy_colours:ColourTask" and result["protocol"]["probe"] == "linear"
    assert result["protocol"]["grid"] == {"lrs": [0.1, 0.01], "wds": [0.0001]}
    assert result["protocol"]["data"] == {"num_train": 120, "num_val": 120}
    assert set(result["per_layer"][0]["metrics"]) == {"top1"}   # metrics: [top1] drops top5
    # the dominant channel is plain in the pixels: a probe on layer 0 must find it (chance 1/3)
    assert result["per_layer"][0]["metrics"]["top1"] >= 0.8
