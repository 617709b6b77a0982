"""RMSNorm over the last dimension with diffusers' semantics (SD3's q/k norm), forward and backward.

diffusers' ``RMSNorm.forward``: ``variance = x.float().pow(2).mean(-1)``, ``x * rsqrt(variance + eps)`` (fp32
because rsqrt is fp32), then, with a weight, cast to the weight's dtype when that is fp16/bf16 and multiply
(plus bias), else cast back to the input's dtype. So the output dtype is the weight's dtype when there is a
weight and the input's otherwise; :func:`rms_norm_ref` reproduces this exactly. The kernels run when weight
and bias share the input's dtype (then all those dtypes agree), compute in fp32 and round once.
Math: csrc/include/fastdiff/math/norm.h.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from fastdiff import _ext
from fastdiff.ops._checks import CPU_DTYPES, CUDA_DTYPES, device_dtype_reasons
from fastdiff.ops.registry import Op

__all__ = ["RMSNorm", "rms_norm", "rms_norm_ref"]

_op = Op("rms_norm")


def rms_norm_ref(input, normalized_shape, weight=None, eps=None, *, bias=None):
    """Pure-PyTorch reference, step for step diffusers' RMSNorm (``eps=None``: ``finfo(input.dtype).eps``
    as ``F.rms_norm``)."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    variance = input.to(torch.float32).pow(2).mean(dims, keepdim=True)
    h = input * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(weight.dtype)
        h = h * weight
    else:
        h = h.to(input.dtype)
    if bias is not None:
        h = h + bias
    return h


def _reasons(backend, dtypes):
    def reasons(input, normalized_shape, weight=None, eps=None, *, bias=None):
        out = device_dtype_reasons(backend, input, weight, bias, dtypes=dtypes)
        if len(normalized_shape) != 1:
            out.append(f"normalized_shape {tuple(normalized_shape)} spans more than the last dimension")
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.dtype != input.dtype:
                out.append(f"{name} is {p.dtype} but input is {input.dtype} (kernels need one dtype)")
        return out
    return reasons


def _f32(p):
    return None if p is None else p.float().contiguous()


def _compiled(input, normalized_shape, weight=None, eps=None, *, bias=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return torch.ops.fastdiff.rms_norm_fwd(input.contiguous(), _f32(weight), _f32(bias), float(eps))[0]


_op.register("ref")(rms_norm_ref)
_op.register("cpu", _reasons("cpu", CPU_DTYPES))(_compiled)
_op.register("cuda", _reasons("cuda", CUDA_DTYPES))(_compiled)

if _ext.has_cpu_kernels():
    @torch.library.register_fake("fastdiff::rms_norm_fwd")
    def _fwd_fake(x, weight, bias, eps):
        return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastdiff::rms_norm_bwd")
    def _bwd_fake(grad, x, weight, rstd, param_grads):
        n = x.shape[-1] if param_grads else 0
        return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)

    def _setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = torch.ops.fastdiff.rms_norm_bwd(grad.contiguous(), x, weight, rstd, bool(need[1] or need[2]))
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None)

    torch.library.register_autograd("fastdiff::rms_norm_fwd", _backward, setup_context=_setup)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, bias=None):
    """``F.rms_norm``'s arguments with diffusers' RMSNorm semantics (see module doc), plus an optional bias."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"rms_norm: input must be a tensor, got {type(input).__name__}")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(normalized_shape)
    if input.dim() < len(normalized_shape) or tuple(input.shape[input.dim() - len(normalized_shape):]) != \
            normalized_shape:
        raise ValueError(f"rms_norm: input of shape {tuple(input.shape)} does not end in normalized_shape "
                         f"{normalized_shape}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != normalized_shape:
            raise ValueError(f"rms_norm: {name} has shape {tuple(p.shape)}, expected {normalized_shape}")
    if not input.is_floating_point():
        raise TypeError(f"rms_norm: input must be floating point, got {input.dtype}")
    return _op(input, normalized_shape, weight, eps, bias=bias)


class RMSNorm(nn.Module):
    """Drop-in for diffusers' ``RMSNorm(dim, eps, elementwise_affine=True, bias=False)``: same arguments,
    attributes (``eps``, ``elementwise_affine``, ``dim``), parameters and state_dict."""

    def __init__(self, dim, eps: float, elementwise_affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if isinstance(dim, numbers.Integral):
            dim = (dim,)
        self.dim = torch.Size(dim)
        self.weight = None
        self.bias = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            if bias:
                self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.dim, self.weight, self.eps, bias=self.bias)
