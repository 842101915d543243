"""The VQ-VAE visual tokenizer: shapes, the EMA codebook update worked by hand, dead-code restarts,
PSNR, save/load errors, and that a few training steps actually learn."""

from __future__ import annotations

import json
import math

import pytest
import torch

from totobench.errors import CheckpointError
from totobench.model.tokenizer import (EMAQuantizer, TokenizerConfig, VisualTokenizer,
                                       evaluate_tokenizer, psnr)

SMALL = TokenizerConfig(codebook_size=8, channels=8, max_channels=16, code_dim=4)


def small_tokenizer(seed: int = 0) -> VisualTokenizer:
    torch.manual_seed(seed)
    return VisualTokenizer(SMALL).eval()


def test_encode_decode_shapes_and_ranges():
    tok = small_tokenizer()
    frames = torch.rand(3, 3, 32, 24)
    ids = tok.encode(frames)
    assert ids.shape == (3, 4, 3) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 8
    out = tok.decode(ids)
    assert out.shape == (3, 3, 32, 24)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    with pytest.raises(ValueError):
        tok.encode(torch.rand(1, 3, 20, 16))  # 20 is not a multiple of 8
    with pytest.raises(ValueError):
        tok.decode(torch.full((1, 2, 2), 8))  # id out of the codebook


def test_encode_picks_the_nearest_code_of_each_latent_in_raster_order():
    tok = small_tokenizer()
    frames = torch.rand(2, 3, 16, 16)
    z = tok.encode_latents(frames)                       # [2, 4, 2, 2]
    ids = tok.encode(frames)
    for n in range(2):
        for r in range(2):
            for c in range(2):
                d = ((tok.quantizer.codebook - z[n, :, r, c]) ** 2).sum(1)
                assert int(ids[n, r, c]) == int(d.argmin())


def test_ema_update_worked_by_hand():
    q = EMAQuantizer(codebook_size=2, code_dim=2, decay=0.5, dead_code_threshold=1.0)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])
    ids = q.nearest(z)
    assert ids.tolist() == [0, 0, 1]
    restarts = q.update(z, ids)
    # counts [2, 1], sums [[4,4],[9,9]]: cluster_size = 0.5*1 + 0.5*[2,1] = [1.5, 1.0],
    # embed_sum = 0.5*codebook + 0.5*sums = [[2,2],[9.5,9.5]], codebook = embed_sum / cluster_size
    assert restarts == 0
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.codebook, torch.tensor([[2 / 1.5, 2 / 1.5], [9.5, 9.5]]), atol=1e-4)


def test_dead_code_is_restarted_on_a_batch_vector():
    q = EMAQuantizer(codebook_size=3, code_dim=2, decay=0.5, dead_code_threshold=1.0)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.0], [1.1, 1.0], [0.0, 0.1]])
    restarts = q.update(z, q.nearest(z), torch.Generator().manual_seed(0))
    assert restarts == 1                       # code 2 got nothing: 0.5 < 1
    assert any(torch.equal(q.codebook[2], v) for v in z)
    assert float(q.cluster_size[2]) == 1.0


def test_psnr_worked_by_hand():
    ref = torch.zeros(1, 3, 8, 8)
    assert psnr(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)   # mse 0.01 -> 20 dB
    assert psnr(ref, ref) == math.inf


def test_evaluate_tokenizer_counts_codes_and_psnr():
    tok = small_tokenizer()
    frames = torch.rand(4, 3, 16, 16)
    ids = tok.encode(frames)
    stats = evaluate_tokenizer(tok, frames, batch_size=3)
    assert stats["codes_used"] == len(ids.unique())
    assert stats["codebook_usage"] == pytest.approx(len(ids.unique()) / 8)
    assert stats["psnr_db"] == pytest.approx(psnr(frames, tok.decode(ids)), abs=1e-4)


def test_training_learns_flat_colours():
    torch.manual_seed(0)
    colours = torch.rand(4, 3, 1, 1)
    frames = colours.expand(4, 3, 16, 16).repeat(4, 1, 1, 1)
    tok = VisualTokenizer(SMALL)
    before = evaluate_tokenizer(tok, frames)["psnr_db"]
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    tok.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        out = tok.training_step(frames, gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = evaluate_tokenizer(tok, frames)
    assert after["psnr_db"] > before + 2, (before, after)
    assert after["codes_used"] >= 3  # restarts keep several codes in use


def test_save_load_round_trip(tmp_path):
    tok = small_tokenizer()
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["codebook_size"] == 8
    back = VisualTokenizer.load(tmp_path / "tok")
    frames = torch.rand(2, 3, 16, 16)
    assert torch.equal(tok.encode(frames), back.encode(frames))
    assert torch.equal(tok.decode(tok.encode(frames)), back.decode(back.encode(frames)))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        VisualTokenizer.load(tmp_path)
    small_tokenizer().save(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VisualTokenizer.load(tmp_path / "a")
    small_tokenizer().save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["codebook_size"] = 16
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        VisualTokenizer.load(tmp_path / "b")
