"""Every committed result in results/ still answers its task file and the bundled checkpoint: the
rule `totobench run` uses to skip a finished task (runner.answers). A commit that changes what a
task measures (a setting, the checkpoint, the tokenizer) must regenerate its results (`make publish`)."""

from pathlib import Path

import pytest

from totobench.model import load_backbone
from totobench.results.schema import load_result
from totobench.runner import answers
from totobench.tasks.config import load_task_config

RESULTS = Path(__file__).resolve().parents[1] / "results"
PUBLISHED = sorted(RESULTS.glob("*/*.json"))
MODEL_SPECS = {"toto-tiny": "toto-tiny", "random-init_toto-tiny": "random-init:toto-tiny", "pixels": "pixels"}


def test_the_published_models_are_known():
    assert PUBLISHED and {p.parent.name for p in PUBLISHED} == set(MODEL_SPECS)


@pytest.fixture(scope="module")
def backbones():
    return {folder: load_backbone(spec) for folder, spec in MODEL_SPECS.items()}


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_published_result_answers_its_task_file_and_checkpoint(path, backbones):
    done = load_result(path)
    cfg = load_task_config(done["task"]["name"])
    backbone = backbones[path.parent.name]
    assert answers(done, list(range(backbone.num_layers)), backbone, cfg, quick=False), (
        f"{path} is stale: its model, layers or task settings differ from tasks/{cfg.name}.yaml and the "
        f"bundled checkpoint; regenerate it with `make publish`")


def test_a_changed_setting_makes_a_result_stale(backbones):
    path = RESULTS / "toto-tiny" / "imagenet.json"
    done = load_result(path)
    backbone = backbones["toto-tiny"]
    layers = list(range(backbone.num_layers))
    assert not answers(done, layers, backbone, load_task_config("imagenet", ["probe.epochs=11"]), quick=False)
    assert answers(done, layers, backbone, load_task_config("imagenet", ["description=words only"]), quick=False)
