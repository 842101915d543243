"""muP (Yang et al. 2022, "Tensor Programs V"; the rules of microsoft/mup for Adam) for Toto.

A model of width `dim` is described relative to a base width (`TotoConfig.mup_base_dim`, the
smallest model of a scaling family, where the learning rate is tuned); m = dim / base. The rules:

- hidden matrices (attention q/k/v/o, the MLP's w1/w2/w3; both dimensions grow with width):
  init std 0.02 * sqrt(1/m) (std ~ 1/sqrt(fan_in)), Adam learning rate lr / m;
- the input embedding, the RMSNorm gains (one dimension grows): init and learning rate unchanged;
- the readout (output head): initialised to zero, learning rate unchanged, and its logits
  multiplied by 1/m in the forward pass (TotoConfig.mup_base_dim, in Toto.forward);
- attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim) (in Attention).

At m = 1 everything but the zero readout and the attention scale equals the standard
parametrization, so the base model is an ordinary Toto. Depth is not covered by muP: the families
here grow in depth too, as the paper's did, and keep the GPT-2 1/sqrt(2 * n_layers) shrink of the
residual projections.
"""

from __future__ import annotations

import math

import torch

from totobench.model.toto import Toto, TotoConfig

HIDDEN_SUFFIXES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                   "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight")


def width_multiplier(config: TotoConfig) -> float:
    """m = dim / mup_base_dim (1.0 for a standard-parametrization config)."""
    return config.dim / config.mup_base_dim if config.mup_base_dim else 1.0


def is_hidden(name: str) -> bool:
    """Whether a parameter is a hidden matrix (both dimensions grow with width)."""
    return name.endswith(HIDDEN_SUFFIXES)


def mup_model(config: TotoConfig, seed: int) -> Toto:
    """Toto(config) drawn under torch seed `seed`, re-initialised by the muP rules above when
    config.mup_base_dim is set (else the standard initialisation, untouched)."""
    torch.manual_seed(seed)
    model = Toto(config)
    if not config.mup_base_dim:
        return model
    shrink = math.sqrt(1.0 / width_multiplier(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_hidden(name):
                p.mul_(shrink)  # std 0.02 (or the depth-shrunk std of wo/w2) times sqrt(base / dim)
        model.output.weight.zero_()
    return model


def lr_multipliers(model: Toto) -> dict[str, float]:
    """{parameter name: factor on the base learning rate}: 1/m for hidden matrices, 1 otherwise
    (all 1 for a standard-parametrization model)."""
    m = width_multiplier(model.config)
    return {name: (1.0 / m if is_hidden(name) else 1.0) for name, _ in model.named_parameters()}


def mup_optimizer(model: Toto, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) with one group per (lr multiplier, decay): weight decay on matrices only.
    Each group keeps its multiplier as "lr_mult"; set_lr(optimizer, lr) applies a schedule."""
    mults = lr_multipliers(model)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        decay = weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((mults[name], decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr * mult, "lr_mult": mult, "weight_decay": decay}
                    for (mult, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Base learning rate `lr` times each group's muP multiplier."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
