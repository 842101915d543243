"""The muP scaling study: muP rules on a micro family, the power-law fit, the frontier, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from totobench.cli import main
from totobench.errors import ConfigError
from totobench.model.toto import Toto, TotoConfig
from totobench.pretrain.mup import lr_multipliers, mup_model, mup_optimizer, set_lr
from totobench.pretrain.scaling import (budgets, sweep_edge, compute_frontier, family_configs, fit_power_law,
                                        load_scaling_config, training_macs_per_token)


def _config(dim: int, base: int | None, n_layers: int = 2) -> TotoConfig:
    return TotoConfig(dim=dim, n_layers=n_layers, n_heads=dim // 8, mlp_hidden=2 * dim, codebook_size=16,
                      vocab_size=19, max_seq_len=64, resolution=16, num_frames=2, mup_base_dim=base)


def test_lr_multipliers_per_parameter_group():
    model = mup_model(_config(64, base=16), seed=0)
    mults = lr_multipliers(model)
    assert mults["layers.0.attention.wq.weight"] == mults["layers.1.mlp.w2.weight"] == 16 / 64
    assert mults["tok_embeddings.weight"] == mults["output.weight"] == mults["norm.weight"] == 1.0
    assert mults["layers.0.attention_norm.weight"] == 1.0
    opt = mup_optimizer(model, lr=0.01, weight_decay=0.1)
    set_lr(opt, 0.02)
    by_mult = {(g["lr_mult"], g["weight_decay"]): (g["lr"], len(g["params"])) for g in opt.param_groups}
    # hidden: 7 matrices x 2 layers at lr/4 with decay; embedding + readout at lr with decay; norms at lr, no decay
    assert by_mult == {(0.25, 0.1): (0.005, 14), (1.0, 0.1): (0.02, 2), (1.0, 0.0): (0.02, 5)}


def test_standard_parametrization_is_untouched():
    sp = mup_model(_config(64, base=None), seed=3)
    torch.manual_seed(3)
    reference = Toto(_config(64, base=None))
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), reference.state_dict().values()))
    assert set(lr_multipliers(sp).values()) == {1.0}


def test_mup_init_and_readout():
    wide, base = mup_model(_config(128, base=32), seed=0), mup_model(_config(32, base=32), seed=0)
    assert float(wide.output.weight.detach().abs().max()) == 0.0         # zero-init readout
    tokens = torch.randint(0, 16, (2, 10))
    assert torch.equal(wide(tokens), torch.zeros(2, 10, 19))      # so every logit starts at 0
    # hidden matrices: std 0.02 * sqrt(base / width); the embedding keeps 0.02
    assert wide.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02 * 0.5, rel=0.05)
    assert base.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert wide.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # logits x base/width and attention 1/head_dim: compare with the same weights in SP
    with torch.no_grad():
        wide.output.weight.normal_()
    sp = Toto(_config(128, base=None))
    sp.load_state_dict(wide.state_dict())
    for block in sp.layers:
        block.attention.scale = 1.0 / sp.config.head_dim
    assert torch.allclose(wide(tokens), sp(tokens) * 32 / 128, atol=1e-6)


def test_fit_recovers_a_and_b_exactly():
    c = np.geomspace(1e9, 1e15, 7)
    fit = fit_power_law(c, 7.32 * c ** -0.0378)
    assert fit["a"] == pytest.approx(7.32, rel=1e-9)
    assert fit["b"] == pytest.approx(-0.0378, rel=1e-9)
    assert fit["points"] == 7
    with pytest.raises(ValueError):
        fit_power_law([1e9], [3.0])


def test_frontier_takes_the_lowest_loss_per_budget():
    curves = {"a1": [{"budget": 1.0, "macs": 1.1, "heldout_loss": 3.0}, {"budget": 2.0, "macs": 2.1, "heldout_loss": 2.5}],
              "a2": [{"budget": 1.0, "macs": 1.5, "heldout_loss": 3.2}, {"budget": 2.0, "macs": 2.0, "heldout_loss": 2.2}]}
    assert [(p["budget"], p["model"], p["heldout_loss"]) for p in compute_frontier(curves)] == \
        [(1.0, "a1", 3.0), (2.0, "a2", 2.2)]
    assert budgets(8.0, 4) == [1.0, 2.0, 4.0, 8.0]


def test_training_macs_per_token_counts_the_matmuls():
    cfg = _config(32, base=None, n_layers=1)
    model, L = Toto(cfg), 10
    d, h = cfg.dim, cfg.mlp_hidden
    # q, k, v, o + SwiGLU's three + the head; attention scores and mixing: 2 * L * d per token, in full
    forward = 4 * d * d + 3 * d * h + d * cfg.vocab_size + 2 * L * d
    assert training_macs_per_token(model, L) == pytest.approx(3 * forward)


def _micro_yaml(tmp_path, world, tokenizer: str = "toto-tiny") -> str:
    path = tmp_path / "micro.yaml"
    path.write_text(f"""
name: micro
threads: 1
tokenizer: {tokenizer}
data: {{root: {world}, heldout_fraction: 0.25}}
sequence: {{num_frames: 2, frame_stride: 2, images_per_sequence: 2}}
family:
  head_dim: 8
  models: [{{name: a1, dim: 16, n_layers: 1}}, {{name: a2, dim: 32, n_layers: 2}}]
train: {{batch_size: 4, warmup_steps: 2, budget_macs: 1.6e+8, budget_points: 3}}
lr_sweep: {{lrs: [0.004, 0.016], budget_macs: 4.0e+7}}
eval: {{heldout_sequences: 4, batch_size: 4}}
quick: {{train: {{budget_points: 2}}}}
""")
    return str(path)


def test_family_shapes_and_config_errors(tmp_path, tiny_world):
    cfg = load_scaling_config(_micro_yaml(tmp_path, tiny_world))
    fam = family_configs(cfg, codebook_size=256, resolution=64, patch_size=8)
    assert [(c.dim, c.n_layers, c.n_heads, c.mup_base_dim) for c in fam.values()] == [(16, 1, 2, 16), (32, 2, 4, 16)]
    assert load_scaling_config(_micro_yaml(tmp_path, tiny_world), quick=True)["train"]["budget_points"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: {models: [{name: a1, dim: 16, n_layers: 1}]}\ntrain: {budget: 1}\n")
    with pytest.raises(ConfigError, match="train: unknown field 'budget'"):
        load_scaling_config(bad)


def test_scaling_command_on_a_micro_family(tmp_path, tiny_world, micro_checkpoint, capsys):
    cfg = _micro_yaml(tmp_path, tiny_world, tokenizer=str(micro_checkpoint))
    out = tmp_path / "out"
    assert main(["scaling", "--config", cfg, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["a1", "a2"]
    assert {r["lr"] for r in results["lr_sweep"]} == {0.004, 0.016}
    assert results["lr_at_edge"] == ("smallest" if results["lr"] == 0.004 else "largest")  # 2 rates: always an edge
    assert all(len(m["curve"]) == 3 and m["curve"][-1]["macs"] >= 1.6e8 for m in results["models"])
    assert len(results["frontier"]) == 3 and math.isfinite(results["fit"]["b"])
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "paper: 7.32 * C^-0.0378" in capsys.readouterr().out
    # a second run reads every finished run back: same results
    assert main(["scaling", "--config", cfg, "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["frontier"] == results["frontier"] and again["fit"] == results["fit"]


def test_sweep_edge():
    sweep = [{"lr": 0.002}, {"lr": 0.004}, {"lr": 0.008}]
    assert [sweep_edge(sweep, lr) for lr in (0.002, 0.004, 0.008)] == ["smallest", None, "largest"]
    assert sweep_edge(sweep[:1], 0.002) is None


def test_scaling_on_token_shards(tmp_path):
    """--data SHARDS: sequences come from `totobench tokenize` shards (their codebook and resolution)."""
    from pretrain_fixtures import make_corpus
    from totobench.model.tokenizer import TokenizerConfig, VisualTokenizer
    root = make_corpus(tmp_path / "data")
    torch.manual_seed(0)
    VisualTokenizer(TokenizerConfig(codebook_size=16, downsample=8, channels=8, max_channels=16, code_dim=8)
                    ).save(tmp_path / "tok")
    shards = tmp_path / "shards"
    assert main(["tokenize", "--tokenizer", f"vqvae:{tmp_path / 'tok'}", "--source", str(root / "videos"),
                 str(root / "images"), "--out", str(shards), "--resolution", "16", "--frames", "2",
                 "--stride", "2"]) == 0
    cfg = tmp_path / "shards.yaml"
    cfg.write_text("""
threads: 1
data: {heldout_fraction: 0.3}
sequence: {num_frames: 2, frame_stride: 2, images_per_sequence: 2}
family: {head_dim: 8, models: [{name: a1, dim: 16, n_layers: 1}, {name: a2, dim: 32, n_layers: 1}]}
train: {batch_size: 2, warmup_steps: 1, budget_macs: 4.0e+6, budget_points: 2}
eval: {heldout_sequences: 2, batch_size: 2}
""")
    out = tmp_path / "out"
    assert main(["scaling", "--config", str(cfg), "--out", str(out), "--data", str(shards)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["n_layers"] for m in results["models"]] == [1, 1]
    assert all(len(m["curve"]) == 2 for m in results["models"]) and not (out / "tokens.npz").exists()
    # 2 + 2 frames x 2 x 2 tokens per sequence: vocab 16 + 3 and length 10 set the per-token MACs of a1
    assert results["models"][0]["macs_per_token"] == pytest.approx(
        3 * (4 * 16 * 16 + 3 * 16 * 48 + 16 * 19 + 2 * 9 * 16))


def test_a_mup_model_is_not_exported_as_a_transformers_llama(tmp_path):
    from totobench.errors import ConfigError
    from totobench.model.hf import save_hf_llama
    from totobench.model.toto import Toto, TotoConfig
    import dataclasses
    config = dataclasses.replace(TotoConfig.preset("toto-tiny"), dim=32, n_layers=1, n_heads=2, mlp_hidden=64,
                                 mup_base_dim=16)
    with pytest.raises(ConfigError, match="muP"):
        save_hf_llama(tmp_path, config, Toto(config).state_dict())
    assert not any(tmp_path.iterdir())
