"""`totobench compare NEW --against PUBLISHED` (what `make run` prints): each (model, task) of NEW
beside the published one, the difference of the best-layer numbers, identical or not per layer."""

import json
import shutil
from pathlib import Path

from totobench.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_against_the_published_results(tmp_path, capsys):
    new = tmp_path / "run"
    shutil.copytree(RESULTS / "toto-tiny", new / "toto-tiny", ignore=shutil.ignore_patterns("*.png"))
    path = new / "toto-tiny" / "imagenet.json"
    doc = json.loads(path.read_text())
    best = doc["best_layer"]["layer"]
    for row in doc["per_layer"]:
        if row["layer"] == best:
            row["metrics"]["top1"] += 0.25
    doc["best_layer"]["metrics"]["top1"] += 0.25
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["compare", str(new / "toto-tiny"), "--against", str(RESULTS)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "toto-tiny" in l and "│" in l]
    imagenet = next(l for l in lines if "│ imagenet " in l)
    assert "+0.2500" in imagenet and "differ" in imagenet
    davis = next(l for l in lines if "│ davis " in l)
    assert "+0.0000" in davis and "identical" in davis
