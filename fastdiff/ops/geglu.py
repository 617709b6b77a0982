"""GEGLU activation of the SD1 transformer feed-forward: ``a * gelu(g)`` with ``[a, g] = x.chunk(2, -1)``.

diffusers' ``GEGLU.forward`` is ``proj`` (a Linear to 2 x dim_out) followed by exactly this: the first half
is the value, the second half the gate, and gelu is the exact erf form (``F.gelu`` default). The fused
kernel reads x once and writes y once (eager: two chunk views, gelu into a temporary, a multiply) and its
backward recomputes gelu from x instead of saving it. Math: csrc/include/fastdiff/math/gelu.h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops._checks import CPU_DTYPES, CUDA_DTYPES, device_dtype_reasons
from fastdiff.ops.registry import Op

__all__ = ["geglu", "geglu_ref"]

_op = Op("geglu")


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference (diffusers' GEGLU after its projection)."""
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


def _compiled(x):
    return torch.ops.fastdiff.geglu(x.contiguous())


_op.register("ref")(geglu_ref)
_op.register("cpu", lambda x: device_dtype_reasons("cpu", x, dtypes=CPU_DTYPES))(_compiled)
_op.register("cuda", lambda x: device_dtype_reasons("cuda", x, dtypes=CUDA_DTYPES))(_compiled)

if _ext.has_cpu_kernels():
    # The C++ op (defined in csrc/cpu/geglu.cpp) gets a shape function for torch.compile and a backward that
    # recomputes gelu from the saved input (one read of x and dy, one write of dx).
    @torch.library.register_fake("fastdiff::geglu")
    def _geglu_fake(x):
        return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))

    @torch.library.register_fake("fastdiff::geglu_backward")
    def _geglu_backward_fake(grad, x):
        return torch.empty_like(x)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.fastdiff.geglu_backward(grad.contiguous(), x)

    torch.library.register_autograd("fastdiff::geglu", _backward, setup_context=_setup)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """``a * gelu(gate)`` for ``a, gate = x.chunk(2, dim=-1)`` (exact erf gelu), differentiable."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"geglu: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension of x must be even (value and gate halves); got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"geglu: x must be a floating-point tensor, got {x.dtype}")
    return _op(x)
