"""Building blocks of the SD1 UNet and VAE on fastdiff's fused ops.

:class:`ResBlock` is diffusers' ``ResnetBlock2D`` (the default configuration the SD1 UNet and VAE use)::

    h   = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]
    h   = conv2(dropout(silu(norm2(h))))
    out = (skip(x) + h) / output_scale_factor        # skip: x, or a 1x1 conv when the channels change

with the elementwise work fused around the convolutions:

- GroupNorm + SiLU is one pass (:func:`fastdiff.ops.group_norm` with ``silu=True``);
- the time-embedding term, a per-(sample, channel) ``(N, C, 1, 1)`` tensor, is a broadcast binary post-op of
  conv1 and the skip is a binary post-op of conv2 (:func:`fastdiff.ops.conv2d` ``residual=``), so neither
  add makes its own pass over the activation;
- convolutions and the time projection are fastdiff :class:`~fastdiff.ops.Conv2d` / :class:`~fastdiff.ops.Linear`
  (oneDNN; bf16 computed in fp32 on CPUs where that is faster, see :mod:`fastdiff.ops._onednn`).

Layout: the block computes in channels_last and returns its input's memory format (channels_last in,
channels_last out; NCHW in, one conversion each way). A model that keeps its activations channels_last pays
no conversion at all. Measured ratios are in benchmarks/bench_conv_block.py.

Parameter names equal diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
``conv_shortcut``), so a diffusers state_dict loads by a strict copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops import Conv2d, Linear, group_norm

__all__ = ["ResBlock", "TimestepEmbedding", "Upsample2D", "apply_group_norm"]


def apply_group_norm(x: torch.Tensor, module: nn.GroupNorm, *, silu: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """``module(x + residual)``, SiLU fused when ``silu``, in one pass (:func:`fastdiff.ops.group_norm` with the
    module's parameters; statistics in fp32, output in x's dtype). Every model's GroupNorm goes through this."""
    return group_norm(x, module.num_groups, module.weight, module.bias, module.eps, silu=silu, residual=residual)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, the SiLU fused into linear_1's output (diffusers' ``TimestepEmbedding``;
    SD3 also uses it as the pooled-text projection, diffusers' ``PixArtAlphaTextProjection(act_fn="silu")``).
    Keys: ``linear_1``, ``linear_2``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.linear_1(x, activation="silu"))


class Upsample2D(nn.Module):
    """2x nearest upsampling, then a 3x3 convolution (diffusers' ``Upsample2D(use_conv=True)``; key ``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm, SiLU, ``time_embedding_norm="default"``) on fused ops.

    Arguments and defaults follow diffusers: ``temb_channels=None`` drops the time projection (VAE blocks),
    ``out_channels=None`` keeps ``in_channels``, ``groups_out`` defaults to ``groups``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, dropout: float = 0.0,
                 output_scale_factor: float = 1.0, conv_shortcut_bias: bool = True):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0,
                                     bias=conv_shortcut_bias) if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResBlock: expected x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        t = None
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResBlock: this block has a time projection (temb_channels set): pass temb")
            if temb.dim() != 2 or temb.shape[0] != x.shape[0]:
                raise ValueError(f"ResBlock: temb must be (N, temb_channels) with N = {x.shape[0]}, "
                                 f"got {tuple(temb.shape)}")
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (N, C, 1, 1): fused into conv1
        # Run channels_last inside the block: oneDNN's convolutions read and write it directly, whereas an
        # NCHW tensor is reordered to a blocked layout and back around every convolution. An NCHW input is
        # converted once here and the output once at the end (the caller gets its own format back).
        nchw_in = not x.is_contiguous(memory_format=torch.channels_last)
        if nchw_in:
            x = x.contiguous(memory_format=torch.channels_last)
        h = apply_group_norm(x, self.norm1, silu=True)
        h = self.conv1(h, residual=t)
        h = apply_group_norm(h, self.norm2, silu=True)
        h = self.dropout(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = self.conv2(h, residual=skip)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out.contiguous() if nchw_in else out
