"""Toto: a LLaMA-style causal decoder over discrete visual tokens.

One block, one model, read top to bottom (the config dataclass, TotoConfig, is in config.py):
RMSNorm pre-norm, multi-head attention with 1-D rotary position embeddings (RoPE) and
`F.scaled_dot_product_attention(is_causal=True)`, a SwiGLU MLP, no biases anywhere, and untied
input embedding and output head.

RoPE uses the "rotate half" layout of Hugging Face `LlamaForCausalLM` (the first half of each head's
channels pairs with the second half), so our weights map onto theirs name for name, unpermuted.

    model = Toto(TotoConfig.preset("toto-tiny"))
    logits = model(tokens)                                     # [B, L, vocab_size]
    feats = model.forward_intermediates(tokens, [0, 3, -1])    # 3 x [B, L, dim], one pass
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from totobench.errors import ConfigError
from totobench.model import checkpoint, hf
from totobench.model.config import TotoConfig, resolve_layers

__all__ = ["Toto", "TotoConfig"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, as one fused kernel
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None):
    """cos, signed sin of shape [seq_len, 1, head_dim] for positions 0..seq_len-1, in the rotate-half
    layout: channel j (< hd/2) turns with channel j + hd/2 by angle pos * base^(-2j/hd).
    The sin table carries the sign of the rotation (-sin for the first half, +sin for the second)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return cos[:, None, :], sin[:, None, :]


def apply_rope(x, cos, sin):
    """x: [B, L, H, hd] -> x rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per channel pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin)


class Attention(nn.Module):
    def __init__(self, config: TotoConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / config.head_dim if config.mup_base_dim else None  # None: SDPA's 1/sqrt(head_dim)
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin):
        B, L, D = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        # rotate while [B, L, H, hd] is contiguous, then move heads forward for attention
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: TotoConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.mlp_hidden, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.mlp_hidden, bias=False)  # up
        self.w2 = nn.Linear(config.mlp_hidden, config.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: TotoConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Toto(nn.Module):
    def __init__(self, config: TotoConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_cos_sin(config.max_seq_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # training only: recompute each block's activations in the backward pass instead of keeping them
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 style: shrink the projections that write into the residual stream with depth
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. As in nanoGPT, the embedding lookup table is left out by default
        (it costs no compute); the output head, norms and blocks are counted."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def _rope(self, seq_len: int, device):
        if seq_len > self.rope_cos.shape[0] or self.rope_cos.device != torch.device(device):
            # longer than max_seq_len (e.g. 16 frames + a start token): extend rather than fail
            cos, sin = rope_cos_sin(max(seq_len, self.config.max_seq_len), self.config.head_dim,
                                    self.config.rope_base, device=device)
            self.rope_cos, self.rope_sin = cos, sin
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def _check_tokens(self, tokens):
        if tokens.dim() != 2:
            raise ConfigError(f"Toto expects tokens of shape [B, L], got {list(tokens.shape)}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [B, L] in [0, vocab_size) -> logits [B, L, vocab_size]."""
        self._check_tokens(tokens)
        x = self.tok_embeddings(tokens)
        cos, sin = self._rope(tokens.shape[1], x.device)
        for block in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.output(self.norm(x))
        # muP readout: logits shrink as 1/width so their updates stay O(1) at any width
        return logits * (self.config.mup_base_dim / self.config.dim) if self.config.mup_base_dim else logits

    def resolve_layers(self, layers) -> list[int]:
        """Layer indices (negatives count from the end) -> non-negative indices, same order.
        Raises ConfigError naming the valid range for an index out of range."""
        return resolve_layers(layers, self.config.n_layers)

    def forward_intermediates(self, tokens: torch.Tensor, layers) -> list[torch.Tensor]:
        """Residual stream after each requested block (0-based, before the final norm).

        tokens: LongTensor [B, L]; layers: int or list of ints, negatives count from the end.
        Returns a list of [B, L, dim] tensors in the order requested. One pass that stops after
        the deepest requested block. Raises ConfigError for an out-of-range index.
        """
        self._check_tokens(tokens)
        take = self.resolve_layers(layers)
        x = self.tok_embeddings(tokens)
        cos, sin = self._rope(tokens.shape[1], x.device)
        by_layer = {}
        for i, block in enumerate(self.layers[: max(take) + 1]):
            x = block(x, cos, sin)
            if i in take:
                by_layer[i] = x
        return [by_layer[i] for i in take]

    # ---- files: the formats live in checkpoint.py and hf.py, which never build a model ----

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> "Toto":
        """The transformer of a totobench checkpoint folder, in eval mode.
        Raises CheckpointError naming the file for anything missing, corrupt or mismatched."""
        model = cls(checkpoint.read_config(directory))
        weights, _ = checkpoint.read_weights(directory, model.state_dict())
        model.load_state_dict(weights)
        return model.to(device).eval()

    def save_hf_llama(self, directory) -> Path:
        """Write config.json + model.safetensors that transformers loads as LlamaForCausalLM."""
        return hf.save_hf_llama(directory, self.config, self.state_dict())

    @classmethod
    def from_hf_llama(cls, directory) -> "Toto":
        """Read a LlamaForCausalLM folder (config.json + safetensors) into a Toto (fp32).
        Raises CheckpointError for a missing file, an unsupported variant or a missing weight."""
        model = cls(hf.read_hf_llama_config(directory))
        model.load_state_dict(hf.read_hf_llama_weights(directory, model.state_dict()))
        return model
