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


_ops = all_ops()
if "sampler_step" in _ops:
    _ops["sampler_step"].register("triton", _sampler_step_reasons)(_sampler_step)
