"""The heads of the attentive probe, each a stack of n independent probes over the same tokens.

    probes = make_probes("aim", n, dim, num_classes, num_heads)   # forward(tokens [B, L, D]) -> [n, B, C]

Three heads (`probe.head`, `HEADS`), each a stack of n independent probes with the same interface:
  "aim"   (AimProbes, the default: AIM's attention-pooling classifier, the head the paper's
          ImageNet table compares with) tokens -> BatchNorm (no affine) -> one learned query as q,
          K/V projections without bias -> attention -> Linear -> logits
  "vjepa" (VJepaProbes: V-JEPA's attentive classifier) a query token -> cross-attention over
          LayerNorm(tokens) -> residual -> LayerNorm -> MLP -> residual -> Linear -> logits
  "mha"   (AttentiveProbes, below) tokens -> LayerNorm -> multi-head attention of one learned
          query -> Linear -> logits; the only head with `positions`

`AttentiveProbes` holds n independent probes with their weights stacked on a leading axis, so a
grid of (lr, wd) probes over the same layer runs as a few batched tensor ops. With a single query
the keys never need to exist: score_l = q_h . (W_k x_l)_h = x_l . (W_k,h^T q_h), and the values
are a projection of the attention-weighted mean of the tokens, so a probe costs O(L * D * heads)
per item instead of the O(L * D^2) of materialised keys and values. The result is exactly
standard multi-head attention (tests compare it with torch's scaled_dot_product_attention).

`positions=(T, H, W)` adds a learnable space-time position embedding to the (normalised) tokens,
laid out frame by frame in raster order, initialised with fixed sines and cosines of frame, row and
column (a third of the channels each), for the `mha` head (the k400-spacetime variant: our
addition). A rotary embedding adds no position vector to the features, so whatever absolute
position a layer holds the model computed itself; without an embedding the probe pools a set of
tokens and reads where or when something changed only as far as the features say it.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench import parallel
from totobench.errors import ConfigError


def spacetime_sincos(frames: int, height: int, width: int, dim: int) -> torch.Tensor:
    """[frames * height * width, dim]: sines and cosines of (frame, row, col), a third of the
    channels each (frame first), tokens in frame-then-raster order; values in [-1, 1]."""
    def axis(n: int, channels: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(channels // 2, dtype=torch.float32) / max(1, channels // 2))
        table = torch.zeros(n, channels)
        table[:, 0:2 * (channels // 2):2], table[:, 1:2 * (channels // 2):2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return table
    third = dim // 3
    t, r, c = axis(frames, third), axis(height, third), axis(width, dim - 2 * third)
    table = torch.cat([t[:, None, None].expand(frames, height, width, third),
                       r[None, :, None].expand(frames, height, width, third),
                       c[None, None, :].expand(frames, height, width, dim - 2 * third)], -1)
    return table.reshape(frames * height * width, dim)


class AttentiveProbes(nn.Module):
    """n independent attentive probes over the same tokens; forward(tokens [B, L, D]) -> logits [n, B, C]."""

    def __init__(self, n: int, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None,
                 positions: tuple[int, int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"probe.num_heads ({num_heads}) must divide the feature dim ({dim})")
        self.num_heads = num_heads
        self.positions = tuple(positions) if positions else None
        if self.positions:
            table = spacetime_sincos(*self.positions, dim)
            self.pos_embed = nn.Parameter(table[None].repeat(n, 1, 1))  # [n, T*H*W, D]

        def normal(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.norm_weight = nn.Parameter(torch.ones(n, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n, dim))
        self.query = normal(n, dim, std=1.0)
        # projections act as x @ W ([D_in, D_out]); variance-preserving init, like nn.Linear's scale
        self.q_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.q_bias = nn.Parameter(torch.zeros(n, dim))
        self.k_proj = normal(n, dim, dim, std=dim ** -0.5)  # no key bias: it shifts all scores of a head equally
        self.v_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.v_bias = nn.Parameter(torch.zeros(n, dim))
        self.out_proj = normal(n, dim, dim, std=dim ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(n, dim))
        self.head_weight = normal(n, dim, num_classes, std=0.01)
        self.head_bias = nn.Parameter(torch.zeros(n, num_classes))

    def decayed(self) -> set[str]:
        """Names of the parameters that weight decay applies to (matrices, not biases/norms/query)."""
        return {"q_proj", "k_proj", "v_proj", "out_proj", "head_weight"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = self.query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        x = F.layer_norm(tokens, (dim,))  # each probe's affine is applied below, after pooling
        q = (self.query[:, None, :] @ self.q_proj)[:, 0] + self.q_bias  # [n, D]
        k_weight = self.k_proj.view(n, dim, heads, head_dim)
        # fold each head's query into its key weights; LayerNorm's scale folds in too, its shift only
        # adds the same constant to every score of a head (softmax ignores it)
        raw_dirs = torch.einsum("ndhe,nhe->ndh", k_weight, q.view(n, heads, head_dim)) / math.sqrt(head_dim)
        key_dirs = raw_dirs * self.norm_weight[:, :, None]
        scores = torch.einsum("bld,ndh->nbhl", x, key_dirs)
        if self.positions:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ConfigError(f"attentive probe: positions {self.positions} need {self.pos_embed.shape[1]} tokens "
                                  f"per item, got {x.shape[1]}")
            # the probe's tokens are LN(x) * w + b + pos: pos meets the key weights unscaled
            scores = scores + torch.einsum("nld,ndh->nhl", self.pos_embed, raw_dirs)[:, None]
        attn = scores.softmax(-1)
        pooled = torch.einsum("nbhl,bld->nbhd", attn, x)  # per-head attention-weighted mean of tokens
        pooled = pooled * self.norm_weight[:, None, None, :] + self.norm_bias[:, None, None, :]
        if self.positions:
            pooled = pooled + torch.einsum("nbhl,nld->nbhd", attn, self.pos_embed)
        v = torch.einsum("nbhd,ndhe->nbhe", pooled, self.v_proj.view(n, dim, heads, head_dim))
        v = v.reshape(n, -1, dim) + self.v_bias[:, None, :]
        out = v @ self.out_proj + self.out_bias[:, None, :]
        return out @ self.head_weight + self.head_bias[:, None, :]


class AttentiveHead(AttentiveProbes):
    """One attentive probe head: forward(tokens [B, L, D]) -> logits [B, num_classes]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None):
        super().__init__(1, dim, num_classes, num_heads, generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens)[0]


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> nn.Parameter:
    """U(-bound, bound): nn.Linear's default init of weight and bias has bound 1/sqrt(fan_in)."""
    return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)


def _trunc_normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None,
                  scale: float = 1.0) -> nn.Parameter:
    """Normal(0, std) truncated to [-2, 2] (absolute bounds, as V-JEPA's trunc_normal_), times scale."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-2.0, b=2.0, generator=generator) * scale)


def _check_heads(dim: int, num_heads: int):
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(f"probe.num_heads ({num_heads}) must divide the feature dim ({dim})")


class AimProbes(nn.Module):
    """n AIM attention-pooling classifiers (AIM's AttentionPoolingClassifier) over the same tokens.

        tokens [B, L, D] -> BatchNorm over channels (no affine, eps 1e-6, momentum 0.1; statistics of
        all B*L tokens in training, running statistics in eval) -> one learned query, used as q
        without projection, attends with K = x W_k, V = x W_v (no biases; heads are contiguous
        D/heads channel chunks; scale 1/sqrt(D/heads)) -> heads concatenated, no output projection
        -> Linear(D, C) without bias (AIM's head: linear_bias defaults to False) -> logits.

    Init as the reference: query normal(0, 0.02); W_k, W_v and the classifier weight keep
    nn.Linear's default init, U(+-1/sqrt(D)). The running statistics are buffers (state_dict
    saves them); rows of a buffer are per probe but equal, as every probe sees the same tokens.
    Computed folded: scores = BN(x) . (W_k,h q_h) and values = W_v of the attention-weighted mean
    of BN(x); BN is affine per channel, so both fold exactly and K, V are never materialised.
    forward(tokens [B, L, D]) -> logits [n, B, C]; call .train()/.eval() as for nn.BatchNorm1d.
    sync_statistics=True (torchrun data parallel, set by the grid): each rank holds its share of
    the batch and the training statistics are those of every rank's tokens (sync BatchNorm, exact
    two passes: all-reduced count and sum give the mean, all-reduced squared deviations the
    variance), so the running statistics stay equal on every rank.
    """

    eps: ClassVar[float] = 1e-6
    momentum: ClassVar[float] = 0.1
    sync_statistics: bool = False

    def __init__(self, n: int, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        bound = dim ** -0.5
        self.query = nn.Parameter(torch.randn(n, dim, generator=generator) * 0.02)
        self.k_proj = _uniform((n, dim, dim), bound, generator)   # x @ W: [D_in, D_out]
        self.v_proj = _uniform((n, dim, dim), bound, generator)
        self.head_weight = _uniform((n, dim, num_classes), bound, generator)
        self.register_buffer("running_mean", torch.zeros(n, dim))
        self.register_buffer("running_var", torch.ones(n, dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def decayed(self) -> set[str]:
        """Weight decay touches the weight matrices (the reference publishes no optimiser grouping)."""
        return {"k_proj", "v_proj", "head_weight"}

    def _statistics(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) [n, D] that normalise the tokens; in training, updates the running statistics."""
        n, dim = self.query.shape
        if not self.training:
            return self.running_mean, (self.running_var + self.eps).rsqrt()
        flat = tokens.reshape(-1, dim)
        count = flat.shape[0]
        # the tokens are frozen features: the statistics need no gradient, and two plain passes are
        # ~2.5x faster here than var_mean over dim 0 (the probe's largest cost), equal to 1e-6 relative
        with torch.no_grad():
            if self.sync_statistics:
                count, mean, var = _synced_statistics(flat)
            else:
                mean = flat.mean(0)
                var = (flat - mean).pow_(2).mean(0)
        with torch.no_grad():
            unbiased = var * (count / max(count - 1, 1))
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
            self.num_batches_tracked += 1
        return mean.expand(n, dim), (var + self.eps).rsqrt().expand(n, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = self.query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        mean, rstd = self._statistics(tokens)
        q = self.query.view(n, heads, head_dim)
        key_dirs = torch.einsum("ndhe,nhe->ndh", self.k_proj.view(n, dim, heads, head_dim), q) / math.sqrt(head_dim)
        key_dirs = key_dirs * rstd[:, :, None]  # BN(x) . k = x . (rstd * k) - mean . (rstd * k)
        scores = torch.einsum("bld,ndh->nbhl", tokens, key_dirs)
        scores = scores - torch.einsum("nd,ndh->nh", mean, key_dirs)[:, None, :, None]
        attn = scores.softmax(-1)
        pooled = torch.einsum("nbhl,bld->nbhd", attn, tokens)  # weights sum to 1: BN of the mean = mean of BN
        pooled = (pooled - mean[:, None, None, :]) * rstd[:, None, None, :]
        v = torch.einsum("nbhd,ndhe->nbhe", pooled, self.v_proj.view(n, dim, heads, head_dim))
        return v.reshape(n, -1, dim) @ self.head_weight


def _synced_statistics(flat: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean [D], biased variance [D]) of the rows [b, D] of every rank (b may be 0 on some)."""
    total, count = parallel.all_reduce_sum([flat.sum(0, dtype=torch.float64),
                                            torch.tensor(flat.shape[0], dtype=torch.float64)])
    count = int(count)
    mean = (total / max(count, 1)).to(flat.dtype)
    (squares,) = parallel.all_reduce_sum([(flat - mean).pow_(2).sum(0, dtype=torch.float64)])
    return count, mean, (squares / max(count, 1)).to(flat.dtype)


class VJepaProbes(nn.Module):
    """n V-JEPA attentive classifiers (V-JEPA's AttentiveClassifier, depth 1) over the same tokens.

        query token q0 [D]; x = LayerNorm(tokens);
        a = MHA(q = q0 W_q + b_q, k = x W_k + b_k, v = x W_v + b_v) W_o + b_o   (heads: contiguous chunks)
        h = q0 + a;  h = h + fc2(GELU(fc1(LayerNorm(h))))   (MLP ratio 4);  logits = h W + b

    Init as the reference: query and every Linear weight of the pooler (q, kv, proj, fc1, fc2)
    trunc-normal std 0.02 on [-2, 2], the proj and fc2 weights then divided by sqrt(2) (its
    rescale for depth 1); their biases 0; LayerNorms (eps 1e-5) weight 1, bias 0. The classifier
    Linear keeps nn.Linear's default init, U(+-1/sqrt(D)) for weight and bias. K and V are never
    materialised (the query folds into the key weights, the values project the attention-weighted
    mean of the normalised tokens: exact, as in AttentiveProbes).
    forward(tokens [B, L, D]) -> logits [n, B, C].
    """

    mlp_ratio: ClassVar[int] = 4

    def __init__(self, n: int, dim: int, num_classes: int, num_heads: int = 8, generator: torch.Generator | None = None):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        hidden, std, rescale = self.mlp_ratio * dim, 0.02, 2 ** -0.5
        zeros, ones = lambda *s: nn.Parameter(torch.zeros(*s)), lambda *s: nn.Parameter(torch.ones(*s))
        self.query = _trunc_normal((n, dim), std, generator)
        self.norm1_weight, self.norm1_bias = ones(n, dim), zeros(n, dim)
        self.q_proj, self.q_bias = _trunc_normal((n, dim, dim), std, generator), zeros(n, dim)  # x @ W: [D_in, D_out]
        self.k_proj, self.k_bias = _trunc_normal((n, dim, dim), std, generator), zeros(n, dim)  # kv's first D outputs
        self.v_proj, self.v_bias = _trunc_normal((n, dim, dim), std, generator), zeros(n, dim)  # kv's last D outputs
        self.out_proj, self.out_bias = _trunc_normal((n, dim, dim), std, generator, rescale), zeros(n, dim)
        self.norm2_weight, self.norm2_bias = ones(n, dim), zeros(n, dim)
        self.fc1_weight, self.fc1_bias = _trunc_normal((n, dim, hidden), std, generator), zeros(n, hidden)
        self.fc2_weight, self.fc2_bias = _trunc_normal((n, hidden, dim), std, generator, rescale), zeros(n, dim)
        self.head_weight = _uniform((n, dim, num_classes), dim ** -0.5, generator)
        self.head_bias = _uniform((n, num_classes), dim ** -0.5, generator)

    def decayed(self) -> set[str]:
        """V-JEPA's grouping: every parameter that is not a bias and not 1-D in its module (so its
        query token [1, 1, D] decays; LayerNorm weights and biases do not)."""
        return {"query", "q_proj", "k_proj", "v_proj", "out_proj", "fc1_weight", "fc2_weight", "head_weight"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = self.query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        x = F.layer_norm(tokens, (dim,))  # each probe's affine folds in below
        q = (self.query[:, None, :] @ self.q_proj)[:, 0] + self.q_bias  # [n, D]
        q_heads = q.view(n, heads, head_dim)
        raw_dirs = torch.einsum("ndhe,nhe->ndh", self.k_proj.view(n, dim, heads, head_dim), q_heads) / math.sqrt(head_dim)
        key_dirs = raw_dirs * self.norm1_weight[:, :, None]
        # what LayerNorm's shift and the key bias add: the same for every token of a head
        shift = (torch.einsum("nd,ndh->nh", self.norm1_bias, raw_dirs)
                 + (self.k_bias.view(n, heads, head_dim) * q_heads).sum(-1) / math.sqrt(head_dim))
        scores = torch.einsum("bld,ndh->nbhl", x, key_dirs) + shift[:, None, :, None]
        attn = scores.softmax(-1)
        pooled = torch.einsum("nbhl,bld->nbhd", attn, x)
        pooled = pooled * self.norm1_weight[:, None, None, :] + self.norm1_bias[:, None, None, :]
        v = torch.einsum("nbhd,ndhe->nbhe", pooled, self.v_proj.view(n, dim, heads, head_dim))
        v = v.reshape(n, -1, dim) + self.v_bias[:, None, :]
        h = self.query[:, None, :] + v @ self.out_proj + self.out_bias[:, None, :]  # residual onto the query
        y = F.layer_norm(h, (dim,)) * self.norm2_weight[:, None, :] + self.norm2_bias[:, None, :]
        y = F.gelu(y @ self.fc1_weight + self.fc1_bias[:, None, :]) @ self.fc2_weight + self.fc2_bias[:, None, :]
        h = h + y
        return h @ self.head_weight + self.head_bias[:, None, :]


HEADS = {"mha": AttentiveProbes, "aim": AimProbes, "vjepa": VJepaProbes}
Head = Literal["mha", "aim", "vjepa"]


def make_probes(head: str, n: int, dim: int, num_classes: int, num_heads: int = 8,
                generator: torch.Generator | None = None, positions: tuple[int, int, int] | None = None) -> nn.Module:
    """n stacked probes of one head ("mha", "aim" or "vjepa"); positions are supported by "mha" only."""
    if head not in HEADS:
        raise ConfigError(f"probe.head: expected one of {', '.join(map(repr, HEADS))}, got {head!r}")
    if positions and head != "mha":
        raise ConfigError(f"probe.positions: only head 'mha' takes a position embedding, got head {head!r}")
    if head == "mha":
        return AttentiveProbes(n, dim, num_classes, num_heads, generator, positions)
    return HEADS[head](n, dim, num_classes, num_heads, generator)
