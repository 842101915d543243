"""Compute, counted one way for every model: FLOPs = 2 x multiply-accumulates.

`count_flops(fn)` runs `fn()` under torch's FlopCounterMode, which counts the matmuls,
convolutions and attention of the ops actually dispatched (elementwise ops are not counted, as in
the usual 6ND accounting). It works on the meta device, so the FLOPs of a billion-parameter
preset are counted without allocating it. The backbones' `flops_per_token` and the scaling study
both use it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Forward FLOPs (2 x MACs) of the torch ops `fn()` runs. Attention runs on the math backend
    here (its matmuls are counted; the fused CPU kernel has no FLOP formula), counted in full:
    a causal mask does not halve the count, as in the usual accounting."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def transformer_flops_per_token(model: torch.nn.Module, seq_len: int, num_layers: int) -> int:
    """Forward FLOPs per token of a token transformer with `forward_intermediates(tokens, layers)`
    over one sequence of `seq_len` tokens through all `num_layers` blocks, output head excluded.
    A model built on the meta device is counted without any memory."""
    device = next(model.parameters()).device
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    return round(count_flops(lambda: model.forward_intermediates(tokens, list(range(num_layers)))) / seq_len)
