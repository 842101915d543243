"""The Toto decoder: preset sizes, forward_intermediates, causality, RoPE, config round trip."""

from pathlib import Path

import pytest
import torch

from totobench.errors import ConfigError
from totobench.model import Toto, TotoConfig


def small_config(**overrides):
    base = dict(dim=32, n_layers=4, n_heads=4, mlp_hidden=48, codebook_size=20, vocab_size=23,
                max_seq_len=16, resolution=16)
    return TotoConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Toto(small_config()).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, target", [("toto-base", 120e6), ("toto-large", 280e6), ("toto-1b", 1.1e9)])
def test_paper_preset_parameter_counts_within_5_percent(name, target):
    with torch.device("meta"):
        model = Toto(TotoConfig.preset(name))
    assert abs(model.num_params() - target) / target < 0.05


def test_parameter_count_by_hand():
    c = small_config()
    per_block = 4 * c.dim * c.dim + 3 * c.dim * c.mlp_hidden + 2 * c.dim
    expected = c.n_layers * per_block + c.dim + c.vocab_size * c.dim  # + final norm + output head
    with torch.device("meta"):
        model = Toto(c)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + c.vocab_size * c.dim


def test_tiny_preset_and_special_tokens():
    c = TotoConfig.preset("toto-tiny")
    assert (c.dim, c.n_layers, c.n_heads, c.mlp_hidden, c.vocab_size) == (256, 8, 8, 704, 259)
    assert (c.image_start_id, c.video_start_id, c.end_id) == (256, 257, 258)
    assert (c.grid, c.tokens_per_frame) == (8, 64)


def test_config_round_trip_and_errors():
    c = small_config(rope_base=500.0)
    assert TotoConfig.from_dict({**c.to_dict(), "architecture": "toto"}) == c
    with pytest.raises(ConfigError, match="n_heads"):
        TotoConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "n_heads"})
    with pytest.raises(ConfigError, match="vocab_size=22 must be >= codebook_size \\+ 3 = 23"):
        small_config(vocab_size=22)
    with pytest.raises(ConfigError, match="toto-tiny"):
        TotoConfig.preset("toto-huge")


def test_forward_shape_and_last_layer_gives_logits(model, tokens):
    with torch.no_grad():
        logits = model(tokens)
        last = model.forward_intermediates(tokens, [-1])[0]
    assert logits.shape == (2, 12, 23)
    torch.testing.assert_close(model.output(model.norm(last)), logits, rtol=0, atol=1e-6)


def test_intermediates_equal_block_by_block_residual_stream(model, tokens):
    with torch.no_grad():
        feats = model.forward_intermediates(tokens, [2, 0, -1, -3])
        x = model.tok_embeddings(tokens)
        cos, sin = model._rope(tokens.shape[1], x.device)
        stream = []
        for block in model.layers:
            x = block(x, cos, sin)
            stream.append(x)
    assert [f.shape for f in feats] == [(2, 12, 32)] * 4
    for f, i in zip(feats, [2, 0, 3, 1]):   # order as requested, negatives resolved
        assert torch.equal(f, stream[i])


def test_forward_stops_after_deepest_requested_block(model, tokens):
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model.forward_intermediates(tokens, [0, 1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


@pytest.mark.parametrize("bad", [4, -5, 100])
def test_out_of_range_layer_names_valid_range(model, tokens, bad):
    with pytest.raises(ConfigError, match=rf"layer {bad} is out of range .* 4 layers: valid indices are 0\.\.3 or -4\.\.-1"):
        model.forward_intermediates(tokens, [0, bad])


def test_empty_or_non_integer_layers_rejected(model, tokens):
    with pytest.raises(ConfigError, match="no layers"):
        model.forward_intermediates(tokens, [])
    with pytest.raises(ConfigError, match="not an integer"):
        model.forward_intermediates(tokens, [1.0])


def test_causal_future_tokens_do_not_change_the_past(model, tokens):
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 23
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_rope_base_changes_output_and_sequences_longer_than_max_seq_len_work(tokens):
    torch.manual_seed(0)
    m1 = Toto(small_config()).eval()
    m2 = Toto(small_config(rope_base=100.0)).eval()
    m2.load_state_dict(m1.state_dict())
    long = torch.randint(0, 23, (1, 40))   # max_seq_len is 16: RoPE tables extend
    with torch.no_grad():
        assert (m1(tokens) - m2(tokens)).abs().max() > 1e-4
        out = m1(long)
    assert out.shape == (1, 40, 23)
    # position 0 has no rotation, so the first token's output is independent of the base
    torch.testing.assert_close(m1(tokens)[:, 0], m2(tokens)[:, 0], rtol=0, atol=1e-6)


def test_forward_in_parts_gives_the_one_pass_values_bit_for_bit():
    """Extraction on CPU runs the transformer on a few sequences at a time (tokens.forward_in_parts):
    with the bundled model's shapes, every layer's output equals the one-pass output exactly."""
    from totobench.model.tokens import forward_in_parts

    model = Toto.from_pretrained(Path(__file__).resolve().parents[1] / "checkpoints" / "toto-tiny")
    tokens = torch.randint(0, model.config.vocab_size, (10, 513), generator=torch.Generator().manual_seed(2))
    layers = list(range(model.config.n_layers))
    with torch.no_grad():
        whole = model.forward_intermediates(tokens, layers)
        parts = forward_in_parts(model, tokens, layers, max_tokens=2048)  # 3 sequences per part
    assert len(parts) == len(layers)
    assert all(torch.equal(a, b) for a, b in zip(parts, whole))
