"""LayerNorm over the last dimension (``F.layer_norm`` / ``nn.LayerNorm``), forward and backward.

The kernels normalise over the last dimension only (every LayerNorm of the SD1 transformer blocks, SD3's
MMDiT and the CLIP/T5 text encoders); ``normalized_shape`` spanning more dimensions goes to the reference.
Weight and bias must share the input's dtype for a kernel (then the output has that dtype too, as
``F.layer_norm``); the kernels compute in fp32 and save per-row mean and rstd for the backward. Automatic
dispatch uses them only when gradients are needed: forward alone does not beat ``F.layer_norm``.
Math: csrc/include/fastdiff/math/norm.h.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops._checks import CPU_DTYPES, CUDA_DTYPES, device_dtype_reasons
from fastdiff.ops.registry import Op, current_backend

__all__ = ["LayerNorm", "layer_norm", "layer_norm_ref"]

_op = Op("layer_norm")


def layer_norm_ref(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Pure-PyTorch reference: ``F.layer_norm``."""
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def _reasons(backend, dtypes):
    def reasons(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        out = device_dtype_reasons(backend, input, weight, bias, dtypes=dtypes)
        # Measured (benchmarks/bench_norms.py): forward alone ties with F.layer_norm, itself one ATen kernel
        # (0.6-1.7x across SD1/SD3 shapes and thread counts), while forward + backward wins 1.3-1.6x. So the
        # automatic choice takes the kernel only when a gradient will be needed; asking for it explicitly
        # (use_backend) still runs it for inference.
        if current_backend() is None and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (input, weight, bias))):
            out.append("forward only: F.layer_norm (one ATen kernel) is as fast; the kernel is chosen "
                       "automatically when gradients are needed")
        if len(normalized_shape) != 1:
            out.append(f"normalized_shape {tuple(normalized_shape)} spans more than the last dimension")
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.dtype != input.dtype:
                out.append(f"{name} is {p.dtype} but input is {input.dtype} (kernels need one dtype)")
        return out
    return reasons


def _f32(p):
    # Kernels read parameters as fp32; the cast is differentiable, so their gradients return in their dtype.
    return None if p is None else p.float().contiguous()


def _compiled(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return torch.ops.fastdiff.layer_norm_fwd(input.contiguous(), _f32(weight), _f32(bias), float(eps))[0]


_op.register("ref")(layer_norm_ref)
_op.register("cpu", _reasons("cpu", CPU_DTYPES))(_compiled)
_op.register("cuda", _reasons("cuda", CUDA_DTYPES))(_compiled)

if _ext.has_cpu_kernels():
    @torch.library.register_fake("fastdiff::layer_norm_fwd")
    def _fwd_fake(x, weight, bias, eps):
        stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
        return torch.empty_like(x), stat, torch.empty_like(stat)

    @torch.library.register_fake("fastdiff::layer_norm_bwd")
    def _bwd_fake(grad, x, weight, mean, rstd, param_grads):
        n = x.shape[-1] if param_grads else 0
        return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)

    def _setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)

    def _backward(ctx, grad, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = torch.ops.fastdiff.layer_norm_bwd(grad.contiguous(), x, weight, mean, rstd,
                                                       bool(need[1] or need[2]))
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None)

    torch.library.register_autograd("fastdiff::layer_norm_fwd", _backward, setup_context=_setup)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``F.layer_norm`` (same arguments); a fused kernel when normalising the last dimension."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"layer_norm: input must be a tensor, got {type(input).__name__}")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(normalized_shape)
    if input.dim() < len(normalized_shape) or tuple(input.shape[input.dim() - len(normalized_shape):]) != \
            normalized_shape:
        raise ValueError(f"layer_norm: input of shape {tuple(input.shape)} does not end in normalized_shape "
                         f"{normalized_shape}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != normalized_shape:
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected {normalized_shape}")
    return _op(input, normalized_shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same arguments, defaults, parameters and state_dict) running :func:`layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
