"""The attentive probe's heads ("aim", "vjepa"; "mha" is tests/test_probes_attentive.py): each
stacked probe equals a plain module written from the head's definition, trains, resumes exactly,
and the spec resolves its attention heads and rejects what a head cannot do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench.errors import ConfigError
from totobench.probes.attentive import (AimProbes, AttentiveProbe, AttentiveProbeGrid, AttentiveSpec, VJepaProbes,
                                        fit_attentive_grid, make_probes, resolve_num_heads)
from totobench.probes.base import ProbeContext, ProbeData

B, L, D, C, HEADS = 5, 7, 24, 6, 4


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, D] -> [B, heads, N, D / heads]: contiguous channel chunks per head."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


class AimReference(nn.Module):
    """AIM's attention-pooling classifier, one probe, written from its definition."""

    def __init__(self, dim, num_classes, heads):
        super().__init__()
        self.heads = heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=False)

    def forward(self, tokens):
        b, _, dim = tokens.shape
        x = self.bn(tokens.transpose(1, 2)).transpose(1, 2)
        q = split_heads(self.query.expand(b, 1, dim), self.heads)
        out = F.scaled_dot_product_attention(q, split_heads(self.k(x), self.heads), split_heads(self.v(x), self.heads))
        return self.linear(out.transpose(1, 2).reshape(b, dim))

    @torch.no_grad()
    def copy_from(self, probes: AimProbes, i: int):
        self.query.copy_(probes.query[i].view(1, 1, -1))
        self.k.weight.copy_(probes.k_proj[i].T)
        self.v.weight.copy_(probes.v_proj[i].T)
        self.linear.weight.copy_(probes.head_weight[i].T)
        self.bn.running_mean.copy_(probes.running_mean[i])
        self.bn.running_var.copy_(probes.running_var[i])
        return self


class VJepaReference(nn.Module):
    """V-JEPA's attentive classifier (depth 1), one probe, written from its definition."""

    def __init__(self, dim, num_classes, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        b, _, dim = tokens.shape
        query = self.query.expand(b, 1, dim)
        k, v = self.kv(self.norm1(tokens)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split_heads(self.q(query), self.heads), split_heads(k, self.heads),
                                             split_heads(v, self.heads))
        h = query + self.proj(out.transpose(1, 2).reshape(b, 1, dim))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.linear(h[:, 0])

    @torch.no_grad()
    def copy_from(self, probes: VJepaProbes, i: int):
        p = probes
        self.query.copy_(p.query[i].view(1, 1, -1))
        self.norm1.weight.copy_(p.norm1_weight[i]), self.norm1.bias.copy_(p.norm1_bias[i])
        self.norm2.weight.copy_(p.norm2_weight[i]), self.norm2.bias.copy_(p.norm2_bias[i])
        self.q.weight.copy_(p.q_proj[i].T), self.q.bias.copy_(p.q_bias[i])
        self.kv.weight.copy_(torch.cat([p.k_proj[i].T, p.v_proj[i].T])), self.kv.bias.copy_(torch.cat([p.k_bias[i], p.v_bias[i]]))
        self.proj.weight.copy_(p.out_proj[i].T), self.proj.bias.copy_(p.out_bias[i])
        self.fc1.weight.copy_(p.fc1_weight[i].T), self.fc1.bias.copy_(p.fc1_bias[i])
        self.fc2.weight.copy_(p.fc2_weight[i].T), self.fc2.bias.copy_(p.fc2_bias[i])
        self.linear.weight.copy_(p.head_weight[i].T), self.linear.bias.copy_(p.head_bias[i])
        return self


REFERENCES = {"aim": (AimProbes, AimReference), "vjepa": (VJepaProbes, VJepaReference)}


def perturbed(head: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A stack of 3 probes moved off its init (norm affines, zero biases, small queries included),
    its running statistics made non-trivial, and random tokens with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    probes = REFERENCES[head][0](3, D, C, num_heads=HEADS, generator=g)
    with torch.no_grad():
        for p in probes.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        if head == "aim":
            probes.running_mean.copy_(0.5 * torch.randn(3, D, generator=g))
            probes.running_var.copy_(0.5 + torch.rand(3, D, generator=g))
    tokens = 1.5 * torch.randn(B, L, D, generator=g) + 0.7
    return probes, tokens


@pytest.mark.parametrize("head", ["aim", "vjepa"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_each_stacked_probe_equals_the_head_written_from_its_definition(head, mode):
    probes, tokens = perturbed(head)
    # in float64, so that 1e-6 measures the folded computation, not float32 rounding (logits are O(1))
    probes, tokens = probes.double(), tokens.double()
    references = [REFERENCES[head][1](D, C, HEADS).double().copy_from(probes, i) for i in range(3)]
    for module in (probes, *references):
        module.train(mode == "train")
    logits = probes(tokens)
    assert logits.shape == (3, B, C)
    for i, reference in enumerate(references):
        torch.testing.assert_close(logits[i], reference(tokens), rtol=0, atol=1e-6)
        if head == "aim":  # train: batch statistics of all B*L tokens moved the running ones; eval: untouched
            torch.testing.assert_close(probes.running_mean[i], reference.bn.running_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(probes.running_var[i], reference.bn.running_var, rtol=0, atol=1e-6)
            assert int(probes.num_batches_tracked) == int(reference.bn.num_batches_tracked) == (mode == "train")


def test_inits_and_weight_decay_follow_the_references():
    g = torch.Generator().manual_seed(0)
    aim = AimProbes(2, 64, 5, num_heads=8, generator=g)
    assert 0.015 < aim.query.std().item() < 0.025                                 # normal(0, 0.02)
    for w in (aim.k_proj, aim.v_proj, aim.head_weight):                           # nn.Linear's U(+-1/sqrt(D))
        assert w.abs().max().item() <= 64 ** -0.5 and w.std().item() == pytest.approx(64 ** -0.5 / math.sqrt(3), rel=0.1)
    assert aim.decayed() == {"k_proj", "v_proj", "head_weight"}
    assert {n for n, _ in aim.named_buffers()} == {"running_mean", "running_var", "num_batches_tracked"}

    vj = VJepaProbes(2, 64, 5, num_heads=8, generator=g)
    for name in ("query", "q_proj", "k_proj", "v_proj", "fc1_weight"):            # trunc normal std 0.02
        assert getattr(vj, name).std().item() == pytest.approx(0.02, rel=0.15), name
    for name in ("out_proj", "fc2_weight"):                                      # then / sqrt(2)
        assert getattr(vj, name).std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.15), name
    assert all(getattr(vj, n).abs().sum() == 0 for n in ("q_bias", "k_bias", "v_bias", "out_bias", "fc1_bias", "fc2_bias"))
    assert vj.decayed() == {"query", "q_proj", "k_proj", "v_proj", "out_proj", "fc1_weight", "fc2_weight", "head_weight"}
    for probes in (aim, vj):  # every decayed name is a parameter; norms, biases (and AIM's query) are not decayed
        names = {n for n, _ in probes.named_parameters()}
        assert probes.decayed() <= names and not any("bias" in n or "norm" in n for n in probes.decayed())


def class_token_signal(n, length=6, dim=16, num_classes=3, seed=0):
    """Noise tokens, one of which (at a random place) carries its class's prototype."""
    g = torch.Generator().manual_seed(seed)
    prototypes = 2.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    tokens = torch.randn(n, length, dim, generator=g)
    tokens[torch.arange(n), torch.randint(0, length, (n,), generator=g)] += prototypes[labels]
    return tokens, labels


@pytest.mark.parametrize("head", ["aim", "vjepa"])
def test_the_grid_learns_with_each_head(head):
    x_train, y_train = class_token_signal(384, seed=1)
    x_val, y_val = class_token_signal(192, seed=2)
    out = fit_attentive_grid({3: x_train}, y_train, {3: x_val}, y_val, 3, lrs=(1e-2,), wds=(1e-4,), epochs=10,
                             batch_size=32, num_heads=4, head=head)
    assert out[3]["metrics"]["top1"] >= 0.9  # chance: 1/3
    assert out[3]["best_hparams"] == {"lr": 1e-2, "wd": 1e-4, "num_heads": 4}


@pytest.mark.parametrize("head", ["aim", "vjepa"])
def test_the_grid_resumes_exactly_with_each_head(head):
    x, y = class_token_signal(96, seed=3)
    tokens = {0: x, 2: 0.5 * x.flip(1)}
    batches = [({k: t[i:i + 32] for k, t in tokens.items()}, y[i:i + 32]) for i in range(0, 96, 32)]
    kwargs = dict(layers=[0, 2], dim=16, num_classes=3, lrs=(1e-3, 1e-2), wds=(0.0, 0.1), num_heads=4,
                  total_steps=9, warmup_steps=2, seed=0, head=head)
    straight = AttentiveProbeGrid(**kwargs)
    for tok, lab in batches * 3:
        straight.train_step(tok, lab)

    first = AttentiveProbeGrid(**kwargs)
    for tok, lab in batches * 2:
        first.train_step(tok, lab)
    first.scores(tokens)  # scoring in between (eval mode) changes nothing
    state = first.state_dict()
    if head == "aim":  # the BatchNorm running statistics travel with the state
        assert {"0.running_mean", "0.running_var", "2.running_mean"} <= set(state["probes"])
    resumed = AttentiveProbeGrid(**kwargs)
    resumed.load_state_dict(state)
    for tok, lab in batches:
        resumed.train_step(tok, lab)

    a, b = straight.scores(tokens), resumed.scores(tokens)
    assert len(a) == 8 and all(torch.equal(a[key], b[key]) for key in a)
    for name, value in straight.probes.state_dict().items():
        assert torch.equal(value, resumed.probes.state_dict()[name]), name
    assert not straight.probes.training  # scoring ran in eval mode
    if head == "aim":
        before = straight.probes["0"].running_mean.clone()
        straight.evaluate(tokens, y)  # held-out scoring: eval mode, running statistics untouched
        assert torch.equal(straight.probes["0"].running_mean, before)


def tiny_data(n, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    tokens = torch.randn(n, 4, dim, generator=g) + labels[:, None, None].float()
    return ProbeData(feats={1: tokens.numpy()}, labels=labels.numpy(), num_classes=3)


def test_num_heads_defaults_to_the_models_then_8_and_must_divide_the_dim():
    spec = AttentiveSpec.from_mapping({"name": "attentive", "epochs": 1, "batch_size": 16, "lrs": [3e-3]}, where="probe")
    assert spec.head == "aim" and spec.num_heads is None
    cpu = torch.device("cpu")
    assert resolve_num_heads(spec, ProbeContext(device=cpu, model_heads=4), 16) == 4
    assert resolve_num_heads(spec, ProbeContext(device=cpu), 16) == 8
    assert resolve_num_heads(AttentiveSpec(num_heads=2), ProbeContext(device=cpu, model_heads=4), 16) == 2
    # the heads that ran are recorded with each layer's result
    results = AttentiveProbe().fit(tiny_data(48), tiny_data(24, seed=1), spec, ProbeContext(device=cpu, model_heads=4))
    assert results[1].best_hparams["num_heads"] == 4
    with pytest.raises(ConfigError) as error:
        resolve_num_heads(spec, ProbeContext(device=cpu, model_heads=3, run_key="abc123:imagenet"), 16)
    message = str(error.value)
    assert "\n" not in message and "probe.num_heads" in message and "16" in message and "abc123" in message
    with pytest.raises(ConfigError, match="probe.num_heads.*feature dim 12"):
        resolve_num_heads(spec, ProbeContext(device=cpu), 12)  # 8 heads without the model's
    with pytest.raises(ConfigError, match="probe.num_heads"):
        AttentiveProbe().fit(tiny_data(48, dim=15), tiny_data(24, dim=15, seed=1), spec,
                             ProbeContext(device=cpu, model_heads=4))


@pytest.mark.parametrize("head", ["aim", "vjepa"])
def test_positions_are_for_the_mha_head_only(head):
    with pytest.raises(ConfigError) as error:
        AttentiveSpec.from_mapping({"name": "attentive", "head": head, "positions": "spacetime"}, where="probe")
    assert "\n" not in str(error.value) and "probe.positions" in str(error.value) and "mha" in str(error.value)
    AttentiveSpec.from_mapping({"name": "attentive", "head": "mha", "positions": "spacetime"}, where="probe")
    with pytest.raises(ConfigError, match="positions"):
        make_probes(head, 2, 16, 3, 4, positions=(2, 2, 2))
    with pytest.raises(ConfigError, match="probe.head"):
        AttentiveSpec.from_mapping({"name": "attentive", "head": "cls"}, where="probe")
