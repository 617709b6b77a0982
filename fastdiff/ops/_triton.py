"""Triton backends of the ops whose modules other files own: registration only.

Each entry adds ``triton`` to an op's registry with the reasons it cannot run an input. The kernels live in
``kernels/`` (installed as ``fastdiff.kernels``) and are imported lazily, at the first call, so importing
fastdiff never imports triton. Attention registers its triton backend in fastdiff/ops/attention.py.
"""
from __future__ import annotations

import torch

from fastdiff.ops._backends import tensor_reasons
from fastdiff.ops.registry import all_ops

__all__: list[str] = []

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inference_only(*ts):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return ["inputs require grad: the fused step is inference-only (the ref backend differentiates)"]
    return []


def _sampler_step_reasons(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None,
                          guidance_scale=None):
    return tensor_reasons("triton", x, model_out, noise, dtypes=_DTYPES) + _inference_only(x, model_out, noise)


def _sampler_step(*args, **kwargs):
    from fastdiff.kernels.sampler_step import sampler_step_triton

    return sampler_step_triton(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# group_norm (fastdiff/ops/group_norm.py semantics: residual full, or per (sample, channel) before the norm)
# ----------------------------------------------------------------------------------------------------------

_GN_MAX_CPG = 64   # the kernels are compiled (and AOT-checked) for up to 64 channels per group


def _gn_per_channel(x, residual):
    if residual is None or residual.shape == x.shape:
        return False
    return tuple(residual.shape[:2]) == tuple(x.shape[:2]) and all(s == 1 for s in residual.shape[2:])


class _GroupNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_groups, eps, silu):
        from fastdiff.kernels.group_norm import group_norm_fwd

        per_c = _gn_per_channel(x, residual)
        r_full = None if per_c else residual
        r_c = residual.reshape(x.shape[0], x.shape[1]) if per_c else None
        y, mean, rstd = group_norm_fwd(x, num_groups, weight, bias, eps, silu, r_full, r_c)
        ctx.save_for_backward(x, weight, bias, r_full, r_c, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.per_c = num_groups, silu, per_c
        ctx.res_shape = None if residual is None else residual.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        from fastdiff.kernels.group_norm import group_norm_bwd

        x, w, b, r_full, r_c, mean, rstd = ctx.saved_tensors
        dx, dw, db, drc = group_norm_bwd(dy, x, ctx.num_groups, w, b, mean, rstd, ctx.silu, r_full, r_c)
        need = ctx.needs_input_grad
        dres = None
        if need[3]:
            dres = (drc.reshape(ctx.res_shape).to(r_c.dtype) if ctx.per_c else dx.to(r_full.dtype))
        return (dx if need[0] else None, dw.to(w.dtype) if need[1] else None, db.to(b.dtype) if need[2] else None,
                dres, None, None, None)


def _group_norm_reasons(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    out = tensor_reasons("triton", x, weight, bias, residual, dtypes=None)
    if x.dtype not in _DTYPES:
        out.append(f"dtype {x.dtype} is not supported (supported: {', '.join(str(d) for d in _DTYPES)})")
    if x.numel() == 0:
        out.append("empty input: the reference handles it")
    if x.dim() >= 2 and num_groups and x.shape[1] // num_groups > _GN_MAX_CPG:
        out.append(f"{x.shape[1] // num_groups} channels per group > {_GN_MAX_CPG} (the compiled tile limit)")
    if residual is not None and residual.dtype != x.dtype and not _gn_per_channel(x, residual):
        out.append("a full residual must have x's dtype")
    return out


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, residual=None):
    return _GroupNormTriton.apply(x, weight, bias, residual, num_groups, float(eps), bool(silu))


_ops = all_ops()
if "sampler_step" in _ops:
    _ops["sampler_step"].register("triton", _sampler_step_reasons)(_sampler_step)
if "group_norm" in _ops:
    _ops["group_norm"].register("triton", _group_norm_reasons)(_group_norm)
