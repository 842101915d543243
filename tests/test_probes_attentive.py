import pytest
import torch
import torch.nn.functional as F

from totobench.errors import CheckpointError, ConfigError
from totobench.probes.attentive import (AttentiveHead, AttentiveProbeGrid, AttentiveProbes, fit_attentive_grid,
                                        fit_attentive_grid_streamed, spacetime_sincos)
from totobench.probes.linear import fit_linear_grid


def one_token_signal(n, length=16, dim=32, num_classes=4, seed=0):
    """Token sets whose class is carried by ONE token at a random position (a marker direction plus
    the class prototype); the other tokens are prototypes of random classes, so a mean over tokens
    mostly counts distractors."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(123)
    prototypes, marker = torch.randn(num_classes, dim, generator=fixed), torch.randn(dim, generator=fixed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    tokens = prototypes[torch.randint(0, num_classes, (n, length), generator=g)]
    tokens = tokens + 0.5 * torch.randn(n, length, dim, generator=g)
    position = torch.randint(0, length, (n,), generator=g)
    tokens[torch.arange(n), position] = prototypes[labels] + marker + 0.5 * torch.randn(n, dim, generator=g)
    return tokens, labels


def reference_attentive(probe: AttentiveProbes, i: int, tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Probe i computed the textbook way: LayerNorm (+ position embedding), materialised keys/values,
    torch's attention."""
    b, length, dim = tokens.shape
    x = F.layer_norm(tokens, (dim,), probe.norm_weight[i], probe.norm_bias[i])
    if probe.positions:
        x = x + probe.pos_embed[i]
    q = probe.query[i] @ probe.q_proj[i] + probe.q_bias[i]
    k, v = x @ probe.k_proj[i], x @ probe.v_proj[i] + probe.v_bias[i]
    split = lambda t: t.reshape(b, -1, num_heads, dim // num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q.expand(b, 1, dim)), split(k), split(v))
    out = out.transpose(1, 2).reshape(b, dim) @ probe.out_proj[i] + probe.out_bias[i]
    return out @ probe.head_weight[i] + probe.head_bias[i]


def test_folded_attention_equals_textbook_multi_head_attention():
    g = torch.Generator().manual_seed(0)
    probes = AttentiveProbes(3, 32, 5, num_heads=4, generator=g)
    with torch.no_grad():  # move every parameter off its init (LayerNorm affine included)
        for p in probes.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    tokens = torch.randn(6, 7, 32, generator=g)
    logits = probes(tokens)
    assert logits.shape == (3, 6, 5)
    for i in range(3):
        torch.testing.assert_close(logits[i], reference_attentive(probes, i, tokens, 4), rtol=1e-4, atol=1e-4)
    single = AttentiveHead(32, 5, num_heads=4, generator=torch.Generator().manual_seed(1))
    assert single(tokens).shape == (6, 5)


def test_position_embedding_folds_like_textbook_attention_over_positioned_tokens():
    g = torch.Generator().manual_seed(0)
    probes = AttentiveProbes(2, 24, 5, num_heads=4, generator=g, positions=(2, 2, 3))
    with torch.no_grad():
        for p in probes.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    tokens = torch.randn(5, 12, 24, generator=g)
    for i in range(2):
        torch.testing.assert_close(probes(tokens)[i], reference_attentive(probes, i, tokens, 4), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="need 12 tokens"):
        probes(tokens[:, :10])


def test_spacetime_sincos_gives_every_frame_row_and_column_its_own_code():
    table = spacetime_sincos(3, 2, 4, 32)
    assert table.shape == (24, 32) and table.abs().max() <= 1
    assert len({tuple(row.tolist()) for row in table}) == 24  # all 3*2*4 positions distinct
    grid = table.reshape(3, 2, 4, 32)
    third = 32 // 3
    # the frame block depends on the frame only, the row block on the row only, the column block on the column only
    assert torch.equal(grid[:, :1, :1, :third].expand(3, 2, 4, third), grid[..., :third])
    assert torch.equal(grid[:1, :, :1, third:2 * third].expand(3, 2, 4, third), grid[..., third:2 * third])
    assert torch.equal(grid[:1, :1, :, 2 * third:].expand(3, 2, 4, 32 - 2 * third), grid[..., 2 * third:])


def where_signal(n, frames=4, side=2, dim=16, seed=0):
    """Two classes with the same multiset of tokens: one marked token sits in the first frames
    (class 0) or the last ones (class 1); only its position tells them apart."""
    g = torch.Generator().manual_seed(seed)
    marker = torch.randn(dim, generator=torch.Generator().manual_seed(7)) * 3
    length = frames * side * side
    tokens = torch.randn(n, length, dim, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    half = length // 2
    position = torch.randint(0, half, (n,), generator=g) + labels * half
    tokens[torch.arange(n), position] += marker
    return tokens, labels


def test_positions_let_the_probe_read_when_something_happens_where_a_set_probe_cannot():
    x_train, y_train = where_signal(600, seed=1)
    x_val, y_val = where_signal(300, seed=2)
    kw = dict(lrs=(3e-3,), wds=(1e-4,), epochs=30, batch_size=50, num_heads=4)
    placed = fit_attentive_grid({0: x_train}, y_train, {0: x_val}, y_val, 2, positions=(4, 2, 2), **kw)
    unordered = fit_attentive_grid({0: x_train}, y_train, {0: x_val}, y_val, 2, **kw)
    assert placed[0]["metrics"]["top1"] >= 0.9
    assert unordered[0]["metrics"]["top1"] <= 0.65


def test_attentive_probe_finds_the_one_informative_token_that_mean_pooling_washes_out():
    x_train, y_train = one_token_signal(512, seed=1)
    x_val, y_val = one_token_signal(256, seed=2)
    attentive = fit_attentive_grid({5: x_train}, y_train, {5: x_val}, y_val, 4, lrs=(1e-3, 3e-3), wds=(1e-4,),
                                   epochs=8, batch_size=64, num_heads=4)
    linear = fit_linear_grid({5: x_train.mean(1)}, y_train, {5: x_val.mean(1)}, y_val, 4, epochs=10, batch_size=64)
    assert attentive[5]["metrics"]["top1"] >= 0.9
    assert linear[5]["metrics"]["top1"] <= 0.5
    assert attentive[5]["best_hparams"]["lr"] in (1e-3, 3e-3)


def batches_of(tokens: dict, labels, batch_size=32):
    return [({layer: t[i:i + batch_size] for layer, t in tokens.items()}, labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


def test_grid_scores_selection_and_exact_resume():
    x, y = one_token_signal(128, length=8, dim=16, num_classes=3, seed=4)
    tokens = {0: x, 2: x.flip(1) * 0.5}
    kwargs = dict(layers=[0, 2], dim=16, num_classes=3, lrs=(1e-3, 1e-2), wds=(0.0, 0.1), num_heads=2,
                  total_steps=8, warmup_steps=2, seed=0)
    batches = batches_of(tokens, y)
    straight = AttentiveProbeGrid(**kwargs)
    for tok, lab in batches + batches:
        straight.train_step(tok, lab)

    resumed = AttentiveProbeGrid(**kwargs)
    for tok, lab in batches:
        resumed.train_step(tok, lab)
    state = resumed.state_dict()
    resumed = AttentiveProbeGrid(**kwargs)
    resumed.load_state_dict(state)
    for tok, lab in batches:
        resumed.train_step(tok, lab)

    a, b = straight.scores(tokens), resumed.scores(tokens)
    assert sorted(a) == sorted((layer, lr, wd) for layer in (0, 2) for lr in (1e-3, 1e-2) for wd in (0.0, 0.1))
    for key in a:
        assert a[key].shape == (128, 3)
        assert torch.equal(a[key], b[key])

    for tok, lab in batches:
        straight.evaluate(tok, lab)
    chosen = straight.select()
    for layer in (0, 2):  # the select score is the chosen probe's top-1, recomputed from its scores
        hp = chosen[layer]["best_hparams"]
        top1 = (a[(layer, hp["lr"], hp["wd"])].argmax(1) == y).float().mean().item()
        assert chosen[layer]["select_score"] == pytest.approx(top1)
        assert torch.equal(straight.selected_scores(tokens)[layer], a[(layer, hp["lr"], hp["wd"])])

    with pytest.raises(CheckpointError):
        AttentiveProbeGrid(**{**kwargs, "lrs": (1e-3,)}).load_state_dict(state)


def test_streamed_helper_resumes_from_its_state_file(tmp_path):
    x, y = one_token_signal(96, length=8, dim=16, num_classes=3, seed=5)
    train, held, val = batches_of({1: x[:64]}, y[:64]), batches_of({1: x[64:80]}, y[64:80]), batches_of({1: x[80:]}, y[80:])
    run = lambda epochs, state: fit_attentive_grid_streamed(
        lambda epoch: train, lambda: held, lambda: val, [1], 16, 3, lrs=(3e-3,), wds=(0.0,), epochs=epochs,
        num_heads=2, steps_per_epoch=len(train), state_path=state, return_scores=True)
    whole = run(3, None)
    state = tmp_path / "grid.pt"
    with pytest.raises(KeyboardInterrupt):  # stop after the 2nd epoch, as a killed run would
        fit_attentive_grid_streamed(lambda epoch: train, lambda: held, lambda: val, [1], 16, 3, lrs=(3e-3,),
                                    wds=(0.0,), epochs=3, num_heads=2, steps_per_epoch=len(train),
                                    state_path=state, on_epoch=lambda e, loss: _stop_after(e, 1))
    resumed = run(3, state)
    assert resumed[1]["metrics"] == whole[1]["metrics"]
    assert torch.equal(resumed[1]["val_scores"], whole[1]["val_scores"])
    assert whole[1]["val_scores"].shape == (16, 3)


def _stop_after(epoch, last):
    if epoch == last:
        raise KeyboardInterrupt
