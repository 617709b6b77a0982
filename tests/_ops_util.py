"""Small helpers shared by the tests of the pointwise/norm ops (backends to iterate, error measures)."""
from __future__ import annotations

import torch

from fastdiff.ops.registry import Op

__all__ = ["available_backends", "max_err", "assert_close_lowp"]


def available_backends(op: Op) -> list[str]:
    """Backends of ``op`` that can run on this machine (CPU tensors: ref and cpu; triton/cuda need a GPU).

    A ``cuda`` implementation registered with ``needs_backend=False`` (attention's torch SDPA) has no
    whole-backend reasons, so a visible GPU is required here as well."""
    return [b for b, why in op.availability().items()
            if not why and b in ("ref", "cpu", "cuda") and (b != "cuda" or torch.cuda.is_available())]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_lowp(got: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor, what: str = "",
                      floor: float = 0.0) -> None:
    """The low-precision rule: ``got``'s error against the fp32 reference is at most 2x the error PyTorch's
    own eager computation in that dtype (``torch_lowp``) makes against the same reference (plus ``floor``
    for the rare case where torch happens to be exact)."""
    assert got.dtype == torch_lowp.dtype, (got.dtype, torch_lowp.dtype)
    assert got.shape == ref32.shape, (got.shape, ref32.shape)
    e_got = max_err(got, ref32)
    e_torch = max_err(torch_lowp, ref32)
    assert e_got <= 2 * e_torch + floor, f"{what}: kernel error {e_got:.3g} > 2 x torch's {e_torch:.3g} (+{floor:g})"
