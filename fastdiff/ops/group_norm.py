"""GroupNorm with an optional fused SiLU and an optional residual added before the norm: the UNet/VAE hot path.

    v = x + residual                      (optional; see below)
    y = group_norm(v, num_groups, weight, bias, eps)        statistics in fp32, biased variance (F.group_norm)
    y = silu(y)                           (optional)

Why this residual form. In the SD1 UNet ResBlock (diffusers ``ResnetBlock2D``, time_embedding_norm "default")
the only add that feeds a GroupNorm and whose sum is not needed afterwards is the time embedding::

    h = conv1(silu(norm1(x)));  h = h + temb_proj(silu(temb))[:, :, None, None];  h = conv2(silu(norm2(h)))

so ``norm2`` becomes ``group_norm(h, G, w, b, eps, silu=True, residual=temb_proj_out)`` and the broadcast add is
never materialised. ``residual`` is therefore either

- per (sample, channel): shape ``(B, C)`` or ``(B, C, 1, ..., 1)``, broadcast over the positions (the ResBlock
  time embedding), or
- a full tensor of ``x``'s shape (a skip stream that is normalised and not reused; the sum is not returned).

The skip add at the end of the block (``x + h``) is not followed by a norm of the same block and its sum is the
next block's input, so fusing it here would need a second output: it is left to the caller (or conv post-ops).

Backends: ``ref`` (pure PyTorch: the oracle, the baseline and the fallback; also fp16 on CPU, which this class of
CPU runs slowly), ``cpu`` (C++: fp32 and bf16, NCHW and channels-last natively, per-ISA kernels), ``cuda``
(fp32, bf16, fp16). The compiled backends have forward and backward (``torch.library`` op with a fake
implementation and a registered autograd formula, so they train and trace under ``torch.compile``).

Documented edge cases: a batch of size 0 gives an empty output (as ``F.group_norm``); inputs with no positions
(a spatial size of 0) raise ValueError (``F.group_norm`` raises too); a NaN or inf in a group makes that whole
group's output NaN and leaves the other groups untouched (as ``F.group_norm``). The compiled backends do not
support double backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops._checks import device_dtype_reasons
from fastdiff.ops.registry import Op
from fastdiff.ops.routing import train_ref_reason

__all__ = ["GroupNorm", "group_norm", "group_norm_ref"]

_op = Op("group_norm")

_CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 goes to ref on CPU (torch's CPU fp16 math runs at ~2 GFLOP/s)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _per_channel(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """True when ``residual`` is the per-(sample, channel) form (broadcast over the positions)."""
    if residual is None or residual.shape == x.shape:
        return False
    return tuple(residual.shape[:2]) == tuple(x.shape[:2]) and all(s == 1 for s in residual.shape[2:])


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    """Pure-PyTorch reference: ``silu?(F.group_norm(x + residual))`` computed in fp32, returned in x's dtype."""
    v = x.float()
    if residual is not None:
        r = residual.float()
        if _per_channel(x, residual):
            r = r.reshape(tuple(x.shape[:2]) + (1,) * (x.dim() - 2))
        v = v + r
    y = F.group_norm(v, num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _reasons(backend, dtypes):
    def reasons(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
        # weight and bias may be float32 beside a bf16/fp16 x (the kernels read fp32 parameters): only x and the
        # residual (checked to share x's dtype) decide the dtype; the device check covers all four.
        out = device_dtype_reasons(backend, x, residual, dtypes=dtypes)
        if not out and any(t is not None and t.device != x.device for t in (weight, bias)):
            out = [f"weight/bias are on {(weight if weight is not None else bias).device}, x on {x.device}"]
        if x.numel() == 0:
            out.append("empty input: the reference handles it")
        return out
    return reasons


def _compiled(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    # The kernels read fp32 parameters; .float() is differentiable, so autograd returns the weight gradient in
    # the weight's own dtype.
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    r_full = r_c = None
    if residual is not None:
        if _per_channel(x, residual):
            r_c = residual.reshape(x.shape[0], x.shape[1]).float().contiguous()
        else:
            r_full = residual
    y, _, _ = torch.ops.fastdiff.group_norm(x, num_groups, w, b, r_full, r_c, float(eps), bool(silu))
    return y


def _cpu_slower(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    # training: the routing row's train_ref (benchmarks/bench_train_ops.py::test_group_norm_train)
    return train_ref_reason("group_norm", x, weight, bias, residual)


_op.register("ref")(group_norm_ref)
_op.register("cpu", _reasons("cpu", _CPU_DTYPES), slower=_cpu_slower)(_compiled)
_op.register("cuda", _reasons("cuda", _CUDA_DTYPES))(_compiled)


if _ext.has_cpu_kernels():

    def _stats_fake(x, num_groups):
        return x.new_empty((x.shape[0], num_groups), dtype=torch.float32)

    @torch.library.register_fake("fastdiff::group_norm")
    def _group_norm_fake(x, num_groups, weight, bias, residual, residual_c, eps, silu):
        return torch.empty_like(x), _stats_fake(x, num_groups), _stats_fake(x, num_groups)

    @torch.library.register_fake("fastdiff::group_norm_backward")
    def _group_norm_backward_fake(grad, x, num_groups, weight, bias, residual, residual_c, mean, rstd, silu):
        c = x.shape[1]
        drc = x.new_empty((x.shape[0], c) if residual_c is not None else (0,), dtype=torch.float32)
        return (torch.empty_like(x), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32), drc)

    def _setup(ctx, inputs, output):
        x, num_groups, w, b, r, rc, _eps, silu = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        ctx.save_for_backward(x, w, b, r, rc, mean, rstd)

    def _backward(ctx, grad, _gmean, _grstd):
        x, w, b, r, rc, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db, drc = torch.ops.fastdiff.group_norm_backward(
            grad, x, ctx.num_groups, w, b, r, rc, mean, rstd, ctx.silu)
        return (dx if need[0] else None, None, dw if need[2] else None, db if need[3] else None,
                dx if need[4] else None, drc if need[5] else None, None, None)

    torch.library.register_autograd("fastdiff::group_norm", _backward, setup_context=_setup)


def _check(x, num_groups, weight, bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must be (B, C, *), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm: x must be a floating-point tensor, got {x.dtype}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: num_channels ({c}) must be divisible by num_groups ({num_groups})")
    if x.dim() > 2 and x.shape[0] > 0 and x[0, 0].numel() == 0:
        raise ValueError(f"group_norm: x has no positions to normalise over (shape {tuple(x.shape)})")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},), got {tuple(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"group_norm: {name} must be {x.dtype} (x's dtype) or float32, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device} but x is on {x.device}")
    if residual is not None:
        if residual.shape != x.shape and not _per_channel(x, residual):
            raise ValueError(f"group_norm: residual must have x's shape {tuple(x.shape)} or be per (sample, channel) "
                             f"({x.shape[0]}, {c}) / ({x.shape[0]}, {c}, 1, ...); got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"group_norm: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"group_norm: residual is on {residual.device} but x is on {x.device}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    """``silu?(F.group_norm(x + residual, num_groups, weight, bias, eps))`` in one fused pass (see module doc).

    Argument order as ``F.group_norm``. ``residual``: x's shape, or (B, C) / (B, C, 1, ...) broadcast over the
    positions. Output in x's dtype and memory format; differentiable in x, weight, bias and residual.
    """
    _check(x, num_groups, weight, bias, residual)
    return _op(x, num_groups, weight, bias, eps, silu=silu, residual=residual)


class GroupNorm(nn.GroupNorm):
    """Drop-in for ``nn.GroupNorm`` (same arguments, defaults, parameters and state_dict) running
    :func:`group_norm`, with an optional fused SiLU (keyword-only ``silu``) and ``forward(x, residual=None)``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, silu: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.silu = silu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, residual=residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")
