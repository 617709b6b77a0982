"""The functional ops and layer classes the Stable Diffusion models are built from, in one place.

All are fastdiff's (:mod:`fastdiff.ops`, :mod:`fastdiff.models.blocks`): drop-in modules with the parameter
names and ``state_dict`` of their torch counterparts, so which backend runs never changes a checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdiff.models.blocks import ResBlock
from fastdiff.ops import Conv2d, LayerNorm, Linear
from fastdiff.ops import attention as _attention
from fastdiff.ops import geglu
from fastdiff.ops import group_norm as _group_norm

__all__ = ["geglu", "group_norm", "attention", "causal_mask", "Conv2d", "Linear", "LayerNorm", "ResBlock"]


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """``norm(x)``, with SiLU fused when ``silu`` (the GroupNorm+SiLU pair every ResBlock starts with)."""
    return _group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


def causal_mask(n: int, device) -> torch.Tensor:
    """(n, n) bool, True where query i may attend key j (j <= i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [masked]) v on (batch, heads, tokens, head_dim); ``mask`` bool, True = attend."""
    return _attention(q, k, v, mask)
