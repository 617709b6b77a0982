"""The few functional ops the Stable Diffusion models call, in one place.

Each one uses fastdiff's fused op when it has landed in :mod:`fastdiff.ops` and plain PyTorch otherwise, so a
model's parameters and ``state_dict`` never depend on which backend runs (switching an op here changes no
checkpoint). Every fallback is the exact math of the fused op (its ``*_ref``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastdiff.ops as _ops

__all__ = ["geglu", "group_norm", "attention", "silu"]

_geglu = getattr(_ops, "geglu", None)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """``a * gelu(gate)`` with ``[a, gate] = x.chunk(2, -1)`` (exact erf gelu, diffusers' GEGLU)."""
    if _geglu is not None:
        return _geglu(x)
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """``norm(x)``, followed by SiLU when ``silu`` (the GroupNorm+SiLU pair every ResBlock starts with)."""
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y) if silu else y


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [+ mask]) v on (batch, heads, tokens, head_dim) tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
