"""Pre-training: schedule, loss masking, the step-keyed sampler, config errors, and a real
kill-and-resume run of `totobench pretrain` on a micro config (SIGKILL mid-run, --resume, same
weights and loss curve as the uninterrupted run)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain_fixtures import REPO, make_corpus, micro_config
from totobench.cli import main
from totobench.errors import ConfigError
from totobench.model.toto import TotoConfig
from totobench.pretrain import (TokenCorpus, batch_for_step, collate, initial_model, load_pretrain_config, lr_at,
                                next_token_targets)


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_lr_schedule_worked_by_hand():
    t = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "steps": 110}
    assert lr_at(0, t) == pytest.approx(1e-4)         # (0+1)/10 of the peak
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(60, t) == pytest.approx(5.5e-4)      # half way through the cosine
    assert lr_at(110, t) == pytest.approx(1e-4)


def test_padding_after_the_end_token_is_ignored():
    end = 9
    seqs = collate([torch.tensor([7, 1, 2, 3, end]), torch.tensor([8, 4, end])], pad_id=end)
    assert seqs.tolist() == [[7, 1, 2, 3, end], [8, 4, end, end, end]]
    inputs, targets = next_token_targets(seqs, end)
    assert inputs.tolist() == [[7, 1, 2, 3], [8, 4, end, end]]
    assert targets.tolist() == [[1, 2, 3, end], [4, end, -100, -100]]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources:\n    - {kind: audio, path: x}\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind"):
        load_pretrain_config(bad)
    bad.write_text("trian: {steps: 3}\n")
    with pytest.raises(ConfigError, match="unknown top-level field 'trian'"):
        load_pretrain_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_pretrain_config(tmp_path / "missing.yaml")
    bad.write_text("data:\n  sources:\n    - {kind: video, path: x}\ntrain: {output_init: tied}\n")
    with pytest.raises(ConfigError, match="train.output_init must be one of random, embedding, got 'tied'"):
        load_pretrain_config(bad)


def test_output_head_can_start_as_a_copy_of_the_embedding():
    mc = TotoConfig.from_dict({**TotoConfig.preset("toto-tiny").to_dict(), "n_layers": 2, "dim": 64, "n_heads": 2,
                               "mlp_hidden": 128, "codebook_size": 32, "vocab_size": 35})
    plain, tied = initial_model(mc, 0), initial_model(mc, 0, "embedding")
    assert torch.equal(tied.output.weight, tied.tok_embeddings.weight)
    assert tied.output.weight.data_ptr() != tied.tok_embeddings.weight.data_ptr()  # still two parameters
    assert torch.equal(tied.tok_embeddings.weight, plain.tok_embeddings.weight)
    assert not torch.equal(plain.output.weight, plain.tok_embeddings.weight)
    # every other weight is the seeded random init (= random-init:<checkpoint>)
    for (name, a), (_, b) in zip(plain.state_dict().items(), tied.state_dict().items()):
        assert name == "output.weight" or torch.equal(a, b), name
    # the head starts out scoring "the next token is this one": the current token gets the top logit
    tokens = torch.arange(32)[None]
    assert torch.equal(tied(tokens).argmax(-1), tokens)


def test_sampler_is_keyed_by_step_and_shards_the_global_batch(tmp_path):
    import numpy as np
    mc = TotoConfig.preset("toto-tiny")
    mc = TotoConfig.from_dict({**mc.to_dict(), "codebook_size": 16, "vocab_size": 19, "resolution": 16,
                               "num_frames": 4, "frame_stride": 2, "images_per_sequence": 4})
    sources = [{"kind": "video", "path": "v", "weight": 1.0, "train": ["a", "b"], "heldout": []},
               {"kind": "image", "path": "i", "weight": 1.0, "train": ["c"] * 5, "heldout": []}]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz",
             **{"0_train_ids": rng.integers(0, 16, (20, 4)).astype(np.int16), "0_train_offsets": np.array([0, 12, 20]),
                "0_heldout_ids": np.zeros((0, 4), np.int16), "0_heldout_offsets": np.array([0]),
                "1_train_ids": rng.integers(0, 16, (5, 4)).astype(np.int16), "1_train_offsets": np.arange(6),
                "1_heldout_ids": np.zeros((0, 4), np.int16), "1_heldout_offsets": np.array([0])})
    corpus = TokenCorpus(tmp_path / "tokens.npz", sources, mc)
    one = batch_for_step(corpus, 0, 5, 4)
    again = batch_for_step(corpus, 0, 5, 4)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not all(torch.equal(a, b) for a, b in zip(one, batch_for_step(corpus, 0, 6, 4)))
    r0, r1 = (batch_for_step(corpus, 0, 5, 4, rank=r, world_size=2) for r in (0, 1))
    assert [s.tolist() for s in (r0[0], r1[0], r0[1], r1[1])] == [s.tolist() for s in one]
    kinds = {int(s[0]) for s in one + batch_for_step(corpus, 0, 6, 8)}
    assert kinds <= {mc.image_start_id, mc.video_start_id}
    # the second video has 8 frames: a 4-frame clip every 2nd frame spans 7, so it is usable
    assert len(corpus.ids[(0, "train")][1]) == 2


def _losses(path: Path) -> list[tuple[int, int, str]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), int(r["tokens"]), r["loss"]) for r in csv.DictReader(f)]


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, corpus_root):
    cfg = micro_config(tmp_path, corpus_root)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["pretrain", "--config", str(cfg), "--out", str(full)]) == 0

    env = {**os.environ, "TOTOBENCH_PRETRAIN_KILL_AT_STEP": "6"}  # after the step-4 checkpoint
    proc = subprocess.run([sys.executable, "-m", "totobench", "pretrain", "--config", str(cfg),
                           "--out", str(killed)], env=env, cwd=REPO, capture_output=True, timeout=900)  # generous: the machine is shared
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(killed / "train_state" / "last.pt", weights_only=False)["step"] == 4
    assert not (killed / "training.json").exists()
    assert [r[0] for r in _losses(killed / "loss_curve.csv")] == [1, 2, 3, 4, 5, 6]

    assert main(["pretrain", "--config", str(cfg), "--out", str(killed)]) == 2  # without --resume
    assert main(["pretrain", "--config", str(cfg), "--out", str(killed), "--resume"]) == 0

    assert _losses(killed / "loss_curve.csv") == _losses(full / "loss_curve.csv")
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (json.loads((d / "training.json").read_text()) for d in (full, killed))
    assert fa["heldout_loss"] == fb["heldout_loss"] and fa["tokens_seen"] == fb["tokens_seen"] == 12 * 4 * 17
    # training did something: held-out loss below the seeded random init of the same shape
    assert fa["heldout_loss"] < fa["heldout_loss_random_init"]
    for name in ("config.json", "model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
                 "loss_curve.png", "README.md"):
        assert (full / name).is_file(), name
