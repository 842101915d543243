"""`totobench pretrain` under torchrun with 2 processes (DDP, gloo on CPU) sees the same global
batches as one process: same tokens, same loss curve (up to float summation order)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from pretrain_fixtures import REPO, make_corpus, micro_config
from totobench.cli import main


def _curve(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), int(r["tokens"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_two_process_torchrun_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(REPO / ".venv" / "bin")) or shutil.which("torchrun")
    assert torchrun, "torchrun not installed next to python"
    root = make_corpus(tmp_path / "data")
    cfg = micro_config(tmp_path, root, steps=6, checkpoint_every=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", "--config", str(cfg), "--out", str(one)]) == 0
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "totobench",
                           "pretrain", "--config", str(cfg), "--out", str(two)],
                          cwd=REPO, capture_output=True, timeout=900)  # generous: the machine is shared
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    a, b = _curve(one / "loss_curve.csv"), _curve(two / "loss_curve.csv")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == 6
    assert [r[2] for r in b] == pytest.approx([r[2] for r in a], rel=1e-4)
    facts = json.loads((two / "training.json").read_text())
    assert facts["processes"] == 2 and facts["command"].startswith("torchrun --standalone --nproc_per_node=2")
    assert facts["heldout_loss"] == pytest.approx(json.loads((one / "training.json").read_text())["heldout_loss"],
                                                  rel=1e-3)
