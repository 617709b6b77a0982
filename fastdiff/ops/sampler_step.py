"""Fused classifier-free guidance + sampler update: one pass over the latents.

The eager sequence it replaces (``sampler_step_ref``)::

    m   = u + g * (c - u)              # CFG; model_out = cat([uncond, cond]) when guidance_scale is given
    y   = px * x + pm * m              # the prediction the sampler needs (x0, eps, v, ...)
    y   = y.clamp(-clip, clip)         # optional
    out = a * y + b * x + s * noise

DDPM (posterior mean + sigma z), DDIM (eq. 12 of Song et al.), Euler and flow-matching Euler are all this
form; :mod:`fastdiff.samplers` derives the coefficients in fp64. The op is inference-only: inputs that require
grad go to the reference, which autograd differentiates.
"""
from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.ops._checks import device_dtype_reasons, grad_reasons
from fastdiff.ops.registry import Op

__all__ = ["sampler_step", "sampler_step_ref"]

_op = Op("sampler_step")


def _check(x, model_out, noise, guidance_scale):
    if not isinstance(x, torch.Tensor) or not isinstance(model_out, torch.Tensor):
        raise TypeError("sampler_step: x and model_out must be tensors")
    want = (2 * x.shape[0],) + tuple(x.shape[1:]) if guidance_scale is not None else tuple(x.shape)
    if tuple(model_out.shape) != want:
        what = ("with guidance_scale, model_out must be cat([uncond, cond]) of shape "
                if guidance_scale is not None else "model_out must have the shape of x, ")
        raise ValueError(f"sampler_step: {what}{want}; got {tuple(model_out.shape)} for x {tuple(x.shape)}")
    if noise is not None and tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"sampler_step: noise {tuple(noise.shape)} must have the shape of x {tuple(x.shape)}")
    if x.dtype != model_out.dtype or (noise is not None and noise.dtype != x.dtype):
        raise TypeError(f"sampler_step: x, model_out and noise must share one dtype; got {x.dtype}, "
                        f"{model_out.dtype}" + (f", {noise.dtype}" if noise is not None else ""))


def sampler_step_ref(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None,
                     guidance_scale=None):
    """Pure-PyTorch reference: the oracle, the benchmark baseline and the fallback (math in fp32)."""
    dtype = x.dtype
    xf, mf = x.float(), model_out.float()
    if guidance_scale is not None:
        u, c = mf.chunk(2)
        mf = u + guidance_scale * (c - u)
    y = pred[0] * xf + pred[1] * mf
    if clip is not None:
        y = y.clamp(-clip, clip)
    out = a * y + b * xf
    if noise is not None and s != 0.0:
        out = out + s * noise.float()
    return out.to(dtype)


def _compiled_reasons(backend, dtypes):
    # device_dtype_reasons answers the common case without building strings: this op runs once per sampling
    # step on small latents, where Python dispatch cost is a visible share of the fused kernel's time.
    def reasons(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None, guidance_scale=None):
        return (device_dtype_reasons(backend, x, model_out, noise, dtypes=dtypes)
                + grad_reasons("sampler_step", x, model_out, noise))
    return reasons


def _compiled(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None, guidance_scale=None):
    return torch.ops.fastdiff.sampler_step(
        x.contiguous(), model_out.contiguous(), None if noise is None else noise.contiguous(),
        None if guidance_scale is None else float(guidance_scale), float(pred[0]), float(pred[1]),
        float(clip) if clip is not None else 0.0, float(a), float(b), float(s))


_op.register("ref")(sampler_step_ref)
_op.register("cpu", _compiled_reasons("cpu", (torch.float32, torch.bfloat16)))(_compiled)
_op.register("cuda", _compiled_reasons("cuda", (torch.float32, torch.bfloat16, torch.float16)))(_compiled)

if _ext.has_cpu_kernels():
    # Shape function for torch.compile: the update has x's shape and dtype (the op gets x contiguous).
    @torch.library.register_fake("fastdiff::sampler_step")
    def _sampler_step_fake(x, model_out, noise, guidance, px, pm, clip, a, b, s):
        return torch.empty_like(x)


def sampler_step(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None, guidance_scale=None):
    """One sampler update ``a * clamp(px*x + pm*m) + b * x + s * noise`` in one pass (see module doc).

    ``model_out`` is ``cat([uncond, cond])`` (batch 2B) when ``guidance_scale`` is given, else batch B.
    ``pred=(px, pm)`` forms the prediction from x and the guided model output; ``clip`` clamps it.
    """
    _check(x, model_out, noise, guidance_scale)
    if clip is not None and clip <= 0:
        raise ValueError(f"sampler_step: clip must be positive (or None for no clamp), got {clip}")
    return _op(x, model_out, a, b, s, noise, pred=pred, clip=clip, guidance_scale=guidance_scale)
