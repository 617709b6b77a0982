"""Input checks shared by the pointwise/norm ops (geglu, layer_norm, rms_norm, modulate, timestep_embedding,
sampler_step): a cheap common-case path in front of :func:`fastdiff.ops._backends.tensor_reasons`.

These ops are small and called hundreds of times a sampling run, so the per-call Python cost of choosing a
backend matters (tensor_reasons builds sets and strings): when every tensor is already on the backend's device
in a supported dtype the answer is an empty list without building anything; otherwise the full check runs
and explains.
"""
from __future__ import annotations

import torch

from fastdiff.ops._backends import tensor_reasons

__all__ = ["CPU_DTYPES", "CUDA_DTYPES", "device_dtype_reasons", "grad_reasons"]

CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 is not fast on x86 CPUs (~2 GFLOP/s matmul)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


def device_dtype_reasons(backend: str, *tensors: torch.Tensor | None, dtypes) -> list[str]:
    dev = _DEVICE.get(backend)
    if dev is not None:
        ok = True
        for t in tensors:
            if t is not None and (t.device.type != dev or t.dtype not in dtypes):
                ok = False
                break
        if ok:
            return []
    return tensor_reasons(backend, *tensors, dtypes=dtypes)


def grad_reasons(op: str, *tensors: torch.Tensor | None) -> list[str]:
    """For inference-only kernels: inputs that require grad go to the reference, which autograd differentiates."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return [f"inputs require grad: the {op} kernel is inference-only (the ref backend differentiates)"]
    return []
