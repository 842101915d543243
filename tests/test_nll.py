"""`totobench nll`: next-token loss per token position and per frame of a clip."""

from __future__ import annotations

import csv

import pytest
import torch

from totobench.cli import main
from totobench.commands.nll import nll_tables, position_nll
from totobench.errors import ConfigError
from totobench.model.toto import Toto, TotoConfig


def test_position_nll_equals_a_hand_computed_cross_entropy():
    torch.manual_seed(0)
    cfg = TotoConfig(dim=32, n_layers=2, n_heads=4, mlp_hidden=64, codebook_size=16, vocab_size=19,
                     max_seq_len=32, resolution=16, num_frames=2)
    model = Toto(cfg).eval()
    ids = torch.randint(0, 16, (2, 8))
    nll = position_nll(model, ids, cfg.video_start_id)
    assert nll.shape == (2, 8)
    for b in range(2):
        for k in range(8):
            # token k from the start token and tokens 0..k-1 alone: a forward over that prefix only
            prefix = torch.cat([torch.tensor([cfg.video_start_id]), ids[b, :k]])[None]
            with torch.no_grad():
                logits = model(prefix)[0, -1].double()
            expected = float(torch.logsumexp(logits, 0) - logits[ids[b, k]])
            assert float(nll[b, k]) == pytest.approx(expected, abs=1e-5)


def test_nll_tables_per_frame_and_per_position():
    nll = torch.tensor([[[4.0, 2.0], [1.0, 3.0]], [[2.0, 4.0], [1.0, 5.0]]])   # [2 clips, 2 frames, 2 tokens]
    changed = torch.tensor([[[False, False], [False, True]], [[False, False], [False, True]]])
    frames, positions = nll_tables(nll, changed, grid=1)
    assert frames == [{"frame": 0, "nll": 3.0, "nll_unchanged": None, "nll_changed": None, "changed_share": None},
                      {"frame": 1, "nll": 2.5, "nll_unchanged": 1.0, "nll_changed": 4.0, "changed_share": 0.5}]
    assert [(p["position"], p["frame"], p["nll"]) for p in positions] == [(0, 0, 3.0), (1, 0, 3.0), (2, 1, 1.0),
                                                                          (3, 1, 4.0)]


def test_nll_command_on_a_micro_checkpoint(tmp_path, tiny_world, micro_checkpoint, capsys):
    out = tmp_path / "nll"
    assert main(["nll", str(micro_checkpoint), "--data", str(tiny_world / "kinetics400"), "--max-clips", "3",
                 "--out", str(out)]) == 0
    frames = list(csv.DictReader((out / "nll.csv").open()))
    positions = list(csv.DictReader((out / "nll_positions.csv").open()))
    assert [int(r["frame"]) for r in frames] == list(range(8))            # the checkpoint's 8-frame clips
    assert len(positions) == 8 * 64                                       # 64 px / 8 = 8 x 8 tokens per frame
    for r in frames:  # each frame's mean is the mean of its positions (the same clips at every position)
        mine = [float(p["nll"]) for p in positions if p["frame"] == r["frame"]]
        assert float(r["nll"]) == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    assert (out / "nll.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 clips" in capsys.readouterr().out


def test_nll_refuses_a_model_without_next_token_head(capsys):
    with pytest.raises(ConfigError, match="expected a Toto over visual tokens"):
        main(["--debug", "nll", "pixels"])
