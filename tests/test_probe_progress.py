"""Probe training shows progress when the output is a log file: a line per stage (issue 22)."""

import io

import numpy as np
import torch
from rich.console import Console

from totobench.probes.base import ProbeContext, ProbeData
from totobench.probes.bc_policy import BcMlpProbe, BcMlpSpec
from totobench.probes.sta_head import StaHeadProbe, StaHeadSpec, sta_targets


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_bc_policies_print_one_line_per_layer_when_not_a_terminal():
    console, out = log_console()
    rng = np.random.default_rng(0)
    feats = {layer: rng.standard_normal((40, 6)).astype(np.float32) for layer in (0, 3)}
    data = ProbeData(feats=feats, targets=rng.uniform(-1, 1, (40, 2)).astype(np.float32))
    ctx = ProbeContext(device=torch.device("cpu"), console=console, desc="robot drawer-open")
    policies = BcMlpProbe().fit(data, None, BcMlpSpec(hidden=(8,), epochs=2), ctx)
    assert sorted(policies) == [0, 3]
    text = out.getvalue()
    assert "robot drawer-open policies (one per layer): 2/2 (100%) train mse " in text
    mse = float(text.split("train mse ")[-1].split()[0])
    assert mse == round(policies[3].facts["train_mse"], 4)


def test_sta_head_prints_epochs_of_every_layer():
    console, out = log_console()
    h = w = 2
    frames = [[{"box": [0, 0, 10, 10], "noun_category_id": 1, "verb_category_id": 0, "time_to_contact": 1.0}]] * 6
    targets = sta_targets(frames, [(20, 20)] * 6, (h, w), num_nouns=2, num_verbs=1)
    feats = {layer: np.random.default_rng(layer).standard_normal((6, h * w, 8)).astype(np.float32) for layer in (1, 2)}
    train = ProbeData(feats=feats, targets=targets, num_classes=(2, 1), token_grid=(1, h, w))
    ctx = ProbeContext(device=torch.device("cpu"), console=console, desc="ego4d-sta")
    results = StaHeadProbe().fit(train, train, StaHeadSpec(epochs=3, hidden=8), ctx)
    assert sorted(results) == [1, 2]
    text = out.getvalue()
    assert "ego4d-sta head epochs: 6/6 (100%) layer 2 loss " in text
