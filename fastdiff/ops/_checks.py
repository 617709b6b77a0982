"""Input checks shared by the ops of fastdiff._C (geglu, group_norm, layer_norm, rms_norm, modulate,
timestep_embedding, sampler_step): a cheap common-case path in front of
:func:`fastdiff.ops._backends.tensor_reasons`.

These ops are small and called hundreds of times a sampling run, so the per-call Python cost of choosing a
backend matters (tensor_reasons builds sets and strings): when every tensor is already on the backend's device
(one device, index included) in a supported dtype the answer is an empty list without building anything;
otherwise the full check runs and explains. For ``cuda`` the GPU must also be one the kernels were compiled
for (:func:`fastdiff.ops._backends.cuda_device_reason`, cached per device).
"""
from __future__ import annotations

import torch

from fastdiff.ops._backends import cuda_device_reason, tensor_reasons

__all__ = ["CPU_DTYPES", "CUDA_DTYPES", "device_dtype_reasons", "grad_reasons"]

CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 is not fast on x86 CPUs (~2 GFLOP/s matmul)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


def device_dtype_reasons(backend: str, *tensors: torch.Tensor | None, dtypes) -> list[str]:
    dev = _DEVICE.get(backend)
    first = None
    if dev is not None:
        ok = True
        for t in tensors:
            if t is None:
                continue
            d = t.device
            if first is None:
                first = d
            if d != first or d.type != dev or t.dtype not in dtypes:
                ok = False
                break
        if ok and (dev != "cuda" or first is None or cuda_device_reason(first.index) is None):
            return []
    out = tensor_reasons(backend, *tensors, dtypes=dtypes)
    if backend == "cuda" and first is not None and first.type == "cuda":
        why = cuda_device_reason(first.index)
        if why is not None:
            out.append(why)
    return out


def grad_reasons(op: str, *tensors: torch.Tensor | None) -> list[str]:
    """For inference-only kernels: inputs that require grad go to the reference, which autograd differentiates."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return [f"inputs require grad: the {op} kernel is inference-only (the ref backend differentiates)"]
    return []
