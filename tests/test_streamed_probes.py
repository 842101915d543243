"""Streamed probe training (tasks/streaming.py, features/stream.py): the probe reads its train split
through the backbone every epoch instead of from the feature cache, with the cached run's numbers."""

from __future__ import annotations

import json

import pytest
import torch

from launch import torchrun_two

from totobench.cli import main
from totobench.errors import ConfigError
from totobench.features.cache import FeatureCache
from totobench.features.extract import extract_features
from totobench.features.stream import ArrayRows, StreamedRows
from totobench.probes.attentive import AttentiveProbeGrid, fit_attentive_rows
from totobench.probes.base import Probe, ProbeContext, ProbeData
from totobench.probes.linear import fit_linear_rows


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 3, 64, 64, generator=g), i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    from totobench.model import load_backbone
    return load_backbone(str(micro_checkpoint))


def _rows(backbone, data, pooling, tmp_path, name):
    """(cached ArrayRows, StreamedRows) of the same items; the streamed ones forward 5 at a time."""
    layers = [0, 3]
    cached = extract_features(backbone, data, layers, kind="image", pooling=pooling, key_parts={"dataset": name},
                              cache=FeatureCache(tmp_path / "cache"), batch_size=8)
    labels = [y for _, y in data]
    shape = tuple(cached.feats[0].shape[1:])
    streamed = StreamedRows(data, labels, layers, shape, kind="image", pooling=pooling, forward_batch=5)
    return ArrayRows(cached.feats, labels), streamed.bind(backbone, "cpu")


def test_streamed_linear_grid_equals_the_cached_one(micro, tmp_path):
    train_c, train_s = _rows(micro, _images(40, 0), "mean", tmp_path, "train")
    val_c, val_s = _rows(micro, _images(15, 1), "mean", tmp_path, "val")
    kw = dict(num_classes=3, lrs=(0.1, 0.01), wds=(1e-4,), epochs=3, batch_size=8, holdout=0.25, whiten=0.01,
              return_scores=True)
    cached = fit_linear_rows(train_c, val_c, **kw)
    streamed = fit_linear_rows(train_s, val_s, **kw)
    for layer in (0, 3):
        assert streamed[layer]["best_hparams"] == cached[layer]["best_hparams"]
        assert streamed[layer]["metrics"] == cached[layer]["metrics"]
        torch.testing.assert_close(streamed[layer]["val_scores"], cached[layer]["val_scores"], atol=1e-4, rtol=1e-4)
    # each epoch (grid 3 + refit 3), the statistics (2 + 2), the held-out slice and val went through the backbone
    assert train_s.forwarded == 30 * 3 + 40 * 3 + 30 * 2 + 40 * 2 + 10
    assert val_s.forwarded == 15


def test_streamed_attentive_grid_equals_the_cached_one(micro, tmp_path):
    train_c, train_s = _rows(micro, _images(40, 0), "tokens", tmp_path, "train")
    val_c, val_s = _rows(micro, _images(15, 1), "tokens", tmp_path, "val")
    kw = dict(num_classes=3, lrs=(1e-3, 3e-4), wds=(1e-4,), epochs=2, batch_size=8, holdout=0.25, num_heads=4,
              head="aim", return_scores=True)
    cached = fit_attentive_rows(train_c, val_c, **kw)
    streamed = fit_attentive_rows(train_s, val_s, **kw)
    for layer in (0, 3):
        assert streamed[layer]["best_hparams"] == cached[layer]["best_hparams"]
        assert streamed[layer]["metrics"] == cached[layer]["metrics"]
        torch.testing.assert_close(streamed[layer]["val_scores"], cached[layer]["val_scores"], atol=1e-4, rtol=1e-4)
    assert train_s.forwarded == 30 * 2 + 10  # two epochs, then the held-out slice once


@pytest.mark.parametrize("stage, epoch", [("grid", 1), ("refit", 0)])
def test_a_killed_streamed_linear_grid_resumes_with_the_same_numbers(micro, tmp_path, stage, epoch):
    _, train = _rows(micro, _images(40, 0), "mean", tmp_path, "train")
    _, val = _rows(micro, _images(15, 1), "mean", tmp_path, "val")
    kw = dict(num_classes=3, lrs=(0.1, 0.01), wds=(1e-4,), epochs=3, batch_size=8, holdout=0.25, whiten=0.01,
              return_scores=True)
    reference = fit_linear_rows(train, val, **kw)
    state = tmp_path / "linear_state.pt"

    def kill(at_stage, at_epoch):
        if (at_stage, at_epoch) == (stage, epoch):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit_linear_rows(train, val, state_path=state, on_epoch=kill, **kw)
    saved = torch.load(state, weights_only=False)
    assert (saved["stage"], saved["epoch"]) == (stage, epoch)
    done = []
    resumed = fit_linear_rows(train, val, state_path=state, on_epoch=lambda *a: done.append(a), **kw)
    assert done == [(stage, e) for e in range(epoch + 1, 3)] + ([("refit", e) for e in range(3)] if stage == "grid"
                                                                else [])
    for layer in (0, 3):
        assert resumed[layer]["best_hparams"] == reference[layer]["best_hparams"]
        assert torch.equal(resumed[layer]["val_scores"], reference[layer]["val_scores"])


def test_the_base_task_has_no_augmented_views():
    from types import SimpleNamespace

    from totobench.tasks.base import Task
    task = Task(SimpleNamespace(name="t", kind="my_kind"))
    with pytest.raises(ConfigError, match="^task t: probe.augment is not supported by task class my_kind$"):
        task.augmented(None, 0, 0)


def test_stored_rows_travel_to_other_ranks_by_file_name(micro, tmp_path):
    import pickle
    _rows(micro, _images(40, 0), "tokens", tmp_path, "train")
    cached, _ = _rows(micro, _images(40, 0), "tokens", tmp_path, "train")   # read from the cache entries
    sent = pickle.dumps(cached)
    assert len(sent) < 2_000 < cached.feats[0].nbytes        # the memmaps' file names, not their rows
    got = pickle.loads(sent)
    index = torch.tensor([3, 0, 39])
    for (a, rows_a), (b, rows_b) in zip(cached.read(index, 2), got.read(index, 2)):
        assert torch.equal(rows_a, rows_b) and all(torch.equal(a[layer], b[layer]) for layer in (0, 3))


def test_the_attentive_probe_says_which_features_it_trained_on():
    from totobench.probes.attentive import AttentiveProbe, AttentiveSpec
    probe, spec = AttentiveProbe(), AttentiveSpec()
    assert probe.deviations(spec) == ["trained on cached features, without the augmentation the reference probes "
                                      "train with"]
    assert probe.deviations(spec, streamed=True) == ["trained on streamed features, without the augmentation the "
                                                     "reference probes train with"]
    assert probe.deviations(AttentiveSpec(augment=True), streamed=True) == []


def test_a_probe_that_cannot_stream_says_so():
    spec = Probe.Spec(name="knn")
    with pytest.raises(ConfigError, match="^probe knn cannot stream its training features; raise --cache-budget$"):
        Probe().fit_streamed(ProbeData(feats={}), ProbeData(feats={}), spec, ProbeContext(device=torch.device("cpu")))


def _run(world, checkpoint, out, task, *extra):
    args = ["run", "--model", str(checkpoint), "--tasks", task, "--layers", "0,-1", "--quick", "--data-root",
            str(world), "--set", "probe.holdout=0.3", *extra, "--out", str(out)]
    assert main(args) == 0
    return json.loads((out / "micro" / f"{task}.json").read_text())


def _folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_cache_budget_0_streams_with_the_cached_numbers_and_writes_nothing(tiny_world, micro_checkpoint, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    features = tmp_path / "home" / "features"
    streamed = _run(tiny_world, micro_checkpoint, tmp_path / "s", "imagenet-linear", "--cache-budget", "0")
    assert _folder_bytes(features) == 0
    assert streamed["protocol"]["streamed"] is True and streamed["protocol"]["cache_budget"] == 0
    assert streamed["protocol"]["val_streamed"] is True and streamed["extra"]["feature_cache"] == "streamed"
    no_cache = _run(tiny_world, micro_checkpoint, tmp_path / "n", "imagenet-linear", "--no-cache")
    assert no_cache["protocol"]["streamed"] is True and no_cache["protocol"]["cache_budget"] == 0
    assert _folder_bytes(features) == 0
    cached = _run(tiny_world, micro_checkpoint, tmp_path / "c", "imagenet-linear")
    assert cached["protocol"]["streamed"] is False and _folder_bytes(features) > 0
    assert streamed["per_layer"] == cached["per_layer"] == no_cache["per_layer"]


def test_a_streamed_run_stays_under_its_budget(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    """A budget that holds val but not train: val is cached, train streamed, the folder grows by <= budget."""
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    features = tmp_path / "home" / "features"
    budget = 12_000  # train (48 images x 2 layers x 64 dims x fp16, + records) ~14.3 kB, val (32 images) ~9.9 kB
    before = _folder_bytes(features)
    out = _run(tiny_world, micro_checkpoint, tmp_path / "b", "imagenet-linear", "--cache-budget", str(budget))
    grown = _folder_bytes(features) - before
    assert out["protocol"]["streamed"] is True and out["protocol"]["val_streamed"] is False
    assert 0 < grown <= budget, grown


def test_a_killed_streamed_attentive_run_resumes_with_the_same_numbers(tiny_world, micro_checkpoint, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    args = ("--cache-budget", "0", "--set", "probe.epochs=3", "--set", "probe.lrs=[0.001]",
            "--set", "probe.batch_size=8")
    step = AttentiveProbeGrid.train_step
    steps = []
    with monkeypatch.context() as patch:
        patch.setattr(AttentiveProbeGrid, "train_step", lambda self, t, y: steps.append(self.step) or step(self, t, y))
        reference = _run(tiny_world, micro_checkpoint, tmp_path / "ref", "imagenet", *args)
    per_epoch = len(steps) // 3
    assert reference["protocol"]["streamed"] is True and len(steps) == 3 * per_epoch > 3
    assert "trained on streamed features, without the augmentation the reference probes train with" in \
        reference["protocol"]["deviations"]

    def killed_in_epoch_1(self, tokens, labels):
        if self.step == per_epoch + 1:
            raise KeyboardInterrupt  # what a kill leaves: the state of epoch 0, no result
        return step(self, tokens, labels)
    out = tmp_path / "r"
    with monkeypatch.context() as patch:
        patch.setattr(AttentiveProbeGrid, "train_step", killed_in_epoch_1)
        assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet", "--layers", "0,-1", "--quick",
                     "--data-root", str(tiny_world), "--set", "probe.holdout=0.3", *args, "--out", str(out)]) == 130
    state = list((out / "micro" / "imagenet").glob("attentive_state_*.pt"))
    assert len(state) == 1 and torch.load(state[0], weights_only=False)["epoch"] == 0
    steps.clear()
    with monkeypatch.context() as patch:
        patch.setattr(AttentiveProbeGrid, "train_step", lambda self, t, y: steps.append(self.step) or step(self, t, y))
        resumed = _run(tiny_world, micro_checkpoint, out, "imagenet", *args)
    assert steps == list(range(per_epoch, 3 * per_epoch))   # epochs 1 and 2 only
    assert resumed["per_layer"] == reference["per_layer"]
    assert not list((out / "micro" / "imagenet").glob("attentive_state_*.pt"))


def test_augmentation_streams_each_epochs_own_views(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    """probe.augment: train streams whatever the budget, epoch e reading task.augmented(train, e, seed)."""
    from totobench.tasks.classification import ImageClassification
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    asked = []
    augmented = ImageClassification.augmented
    monkeypatch.setattr(ImageClassification, "augmented",
                        lambda self, split, epoch, seed: asked.append((split.name, epoch, seed)) or
                        augmented(self, split, epoch, seed))
    out = _run(tiny_world, micro_checkpoint, tmp_path / "a", "imagenet-linear", "--set", "probe.augment=true",
               "--set", "probe.epochs=2")
    assert out["protocol"]["streamed"] is True and out["protocol"]["augment"] is True
    assert out["protocol"]["val_streamed"] is False            # the default budget holds val
    # checked once up front, then the grid's epochs 0, 1 and the refit's 0, 1
    assert asked == [("train", 0, 0), ("train", 0, 0), ("train", 1, 0), ("train", 0, 0), ("train", 1, 0)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task, forwarded, val_streamed", [
    # 32 fitted images (4 classes x 12, 4 each held out) x (2 statistics passes + 3 epochs), the 16 held out
    # once, all 48 x (2 + 3) for the refit: 416 items, half per rank; the 32 val images are cached
    ("imagenet-linear", 208, False),
    # the attentive grid (AIM head): 32 fitted x 3 epochs, the 16 held out once; val's tokens exceed the
    # budget, so its 32 images stream too: 144 items
    ("imagenet", 72, True)])
def test_torchrun_two_processes_stream_as_one_process(tiny_world, micro_checkpoint, tmp_path, monkeypatch, task,
                                                      forwarded, val_streamed):
    args = ["run", "--model", str(micro_checkpoint), "--tasks", task, "--layers", "0,-1", "--quick",
            "--set", "probe.holdout=0.3", "--set", "batch_size=8", "--set", "probe.epochs=3",
            "--data-root", str(tiny_world), "--cache-budget", "12000"]   # train streamed
    proc = torchrun_two(args, tmp_path / "home-2", tmp_path / "two")
    # every rank forwarded its share of each batch only; cached val images were extracted, 2 chunks per rank
    assert f"{task} streamed probe: items forwarded per rank [{forwarded}, {forwarded}]" in proc.stdout, \
        proc.stdout[-1500:]
    assert val_streamed or f"{task} val: chunks computed per rank [2, 2]" in proc.stdout, proc.stdout[-1500:]
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home-1"))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "micro" / f"{task}.json").read_text())
    two = json.loads((tmp_path / "two" / "micro" / f"{task}.json").read_text())
    assert two["protocol"]["streamed"] is True and two["protocol"]["val_streamed"] is val_streamed
    # the ranks train data-parallel: their logits equal one process's to float32 summation order (within
    # 2e-5 of the largest logit, tests/test_probe_data_parallel.py); what a result holds is counted from
    # them (top-1/5, held-out choice and score), so it is equal unless a margin is that thin
    assert two["per_layer"] == one["per_layer"]
