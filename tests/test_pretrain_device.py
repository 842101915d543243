"""`totobench pretrain --device` (issue 21): the whole micro pre-training with the device passed
explicitly runs the same code path as the default and gives the same numbers; precision follows the
device when the config leaves it unset; last.pt holds CPU tensors; `data.shard_weights` sets each
shard source's share of the draws (and its errors are one line); pre-training on shards with 2 gloo
ranks follows the one-process loss curve; on a machine with CUDA, the micro run on the GPU."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from pretrain_fixtures import MICRO_CONFIG, REPO, make_corpus, make_tokenizer, micro_config
from totobench.cli import main
from totobench.errors import ConfigError
from totobench.model.toto import Toto
from totobench.pretrain import load_pretrain_config
from totobench.pretrain.config import model_cfg
from totobench.pretrain.shards import ShardCorpus, match_sources
from totobench.pretrain.tokenizer_stage import tokenize_to_shards
from totobench.model.backbone import resolve_precision

# Largest relative difference allowed between the 2-rank and the one-process loss curves (float
# summation order only: the ranks see the same global batches).
DDP_REL_TOL = 1e-5  # measured 3.6e-7


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_root):
    """Token shards of the micro corpus (sources videos/, images/) by a random VQ-VAE whose codes
    start on the corpus's latents (so that files get different codes)."""
    tmp = tmp_path_factory.mktemp("shards")
    spec = make_tokenizer(sorted((corpus_root / "videos").glob("*.mp4")), tmp / "tok")
    tokenize_to_shards(spec, [str(corpus_root / "videos"), str(corpus_root / "images")],
                       tmp / "shards", resolution=16, frames=4, stride=2)
    return tmp / "shards"


def _curve(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), int(r["tokens"]), float(r["loss"])) for r in csv.DictReader(f)]


def _shard_config(tmp_path, shards_dir, weights=None, **train) -> str:
    cfg = yaml.safe_load(MICRO_CONFIG.read_text())
    cfg["data"] = {"shards": str(shards_dir), "heldout_fraction": 0.2, "shard_weights": weights}
    cfg["train"].update(train)
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_explicit_cpu_device_runs_the_whole_micro_pretrain(tmp_path, corpus_root):
    cfg = micro_config(tmp_path, corpus_root, steps=6, checkpoint_every=3)
    default, cpu = tmp_path / "default", tmp_path / "cpu"
    assert main(["pretrain", "--config", str(cfg), "--out", str(default)]) == 0
    assert main(["pretrain", "--config", str(cfg), "--out", str(cpu), "--device", "cpu"]) == 0
    assert _curve(cpu / "loss_curve.csv") == _curve(default / "loss_curve.csv") and len(_curve(cpu / "loss_curve.csv")) == 6
    facts = json.loads((cpu / "training.json").read_text())
    assert facts["device"] == "cpu" and facts["config"]["device"] == "cpu"
    assert facts["config"]["train"]["precision"] == "fp32"  # unset in the config: fp32 on the CPU
    assert facts["command"].endswith("--device cpu") and facts["steps"] == 6
    assert facts["heldout_loss"] == json.loads((default / "training.json").read_text())["heldout_loss"]
    assert facts["heldout_loss"] < facts["heldout_loss_random_init"]
    state = torch.load(cpu / "train_state" / "last.pt", map_location="cpu", weights_only=False)
    tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values()
                                               for v in s.values() if torch.is_tensor(v)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_precision_follows_the_device_unless_set():
    assert load_pretrain_config(MICRO_CONFIG)["train"]["precision"] is None
    assert resolve_precision(None, torch.device("cuda", 0)) == "bf16"  # the rule pretrain() applies
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, corpus_root, capsys):
    cfg = micro_config(tmp_path, corpus_root)
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_device_and_shard_weight_config_errors(tmp_path, corpus_root, shards):
    base = yaml.safe_load(micro_config(tmp_path, corpus_root).read_text())
    for over, message in [({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
                          ({"data": {**base["data"], "shard_weights": {"videos": 1}}},
                           "data.shard_weights weighs the sources of data.shards, which is not set")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, **over}))
        with pytest.raises(ConfigError, match=message):
            load_pretrain_config(tmp_path / "bad.yaml")
    for weights, message in [({"videos": 0}, "data.shard_weights.videos must be a number > 0, got 0"),
                             ([0.6, 0.4], "data.shard_weights must map source names to weights")]:
        with pytest.raises(ConfigError, match=message):
            load_pretrain_config(_shard_config(tmp_path, shards, weights))
    mc = model_cfg(load_pretrain_config(_shard_config(tmp_path, shards)))
    for weights, message in [({"videos": 1, "audio": 1}, "'audio' names none of the sources of"),
                             ({"videos": 1}, r"no weight for the source .*images of"),
                             ({"videos": 1, "images": 1, f"{corpus_root.name}/images": 2}, "two names of one source")]:
        with pytest.raises(ConfigError, match=message):
            ShardCorpus(shards, mc, 0.2, weights)
    twin = tmp_path / "twin" / "images"  # a second source whose last folder is also "images"
    with pytest.raises(ConfigError, match=r"'images' names 2 \(.*\): give more of its path"):
        match_sources("images", [str(corpus_root / "images"), str(twin)], shards)


def test_shard_weights_set_each_source_share_of_the_draws(tmp_path, shards, corpus_root):
    mc = model_cfg(load_pretrain_config(_shard_config(tmp_path, shards)))
    equal = ShardCorpus(shards, mc, 0.2)
    weighted = ShardCorpus(shards, mc, 0.2, {f"{corpus_root.name}/videos": 0.8, str(corpus_root / "images"): 0.2})
    assert [s["weight"] for s in equal.facts()["sources"]] == [0.5, 0.5]
    assert [(s["kind"], s["weight"]) for s in weighted.facts()["sources"]] == [("video", 0.8), ("image", 0.2)]
    n = 2000
    videos = sum(int(weighted.sample([0, 2, 0, g])[0]) == mc.video_start_id for g in range(n))
    assert abs(videos / n - 0.8) < 0.03  # binomial sd 0.009
    # no weights: the draws of before (every stream equally likely, the same random numbers)
    first = [equal.sample([0, 2, 0, g]).tolist() for g in range(20)]
    assert first == [ShardCorpus(shards, mc, 0.2).sample([0, 2, 0, g]).tolist() for g in range(20)]
    assert 5 <= sum(s[0] == mc.video_start_id for s in first) <= 15


def test_ddp_on_shards_matches_one_process(tmp_path, shards):
    torchrun = shutil.which("torchrun", path=str(REPO / ".venv" / "bin")) or shutil.which("torchrun")
    assert torchrun, "torchrun not installed next to python"
    cfg = _shard_config(tmp_path, shards, {"videos": 0.7, "images": 0.3}, steps=4, checkpoint_every=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", "--config", cfg, "--out", str(one), "--device", "cpu"]) == 0
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "totobench", "pretrain",
                           "--config", cfg, "--out", str(two), "--device", "cpu"],
                          cwd=REPO, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    a, b = _curve(one / "loss_curve.csv"), _curve(two / "loss_curve.csv")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == 4
    assert [r[2] for r in b] == pytest.approx([r[2] for r in a], rel=DDP_REL_TOL)
    facts = json.loads((two / "training.json").read_text())
    assert facts["processes"] == 2 and facts["device"] == "cpu"
    assert [s["weight"] for s in facts["data"]["sources"]] == [0.7, 0.3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_micro_pretrain_on_cuda(tmp_path, corpus_root):
    cfg = micro_config(tmp_path, corpus_root, steps=6, checkpoint_every=3)
    out = tmp_path / "cuda"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--device", "cuda"]) == 0
    facts = json.loads((out / "training.json").read_text())
    assert facts["device"].startswith("cuda") and facts["config"]["train"]["precision"] == "bf16"
    assert np.isfinite(facts["heldout_loss"]) and facts["heldout_loss"] < facts["heldout_loss_random_init"]
    state = torch.load(out / "train_state" / "last.pt", map_location="cpu", weights_only=False)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    model = Toto.from_pretrained(out)  # the checkpoint folder loads on a machine without a GPU
    assert next(model.parameters()).device.type == "cpu"
    # the GPU run continues on the CPU: resume reads last.pt with map_location
    assert main(["pretrain", "--config", str(micro_config(tmp_path, corpus_root, steps=8, checkpoint_every=3)),
                 "--out", str(out), "--device", "cpu", "--resume", "--precision", "bf16"]) == 0
    assert [r[0] for r in _curve(out / "loss_curve.csv")] == list(range(1, 9))
