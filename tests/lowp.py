"""The low-precision tolerance rule of the test suite, in one place (imported by the op and model tests).

A kernel's error against a high-precision reference may be at most about 2x the error PyTorch's own eager
computation makes in the same dtype against the same reference. Fixed tolerances are for fp32 only.
"""
from __future__ import annotations

import torch

__all__ = ["max_err", "assert_close_lowp"]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_lowp(got: torch.Tensor, ref: torch.Tensor, torch_lowp: torch.Tensor, what: str = "",
                      floor: float = 0.0) -> None:
    """The low-precision rule: ``got``'s error against the fp32 / fp64 reference ``ref`` is at most 2x the error
    PyTorch's own eager computation in that dtype (``torch_lowp``) makes against the same reference (plus
    ``floor`` for the rare case where torch happens to be exact)."""
    assert got.dtype == torch_lowp.dtype, (got.dtype, torch_lowp.dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    e_got = max_err(got, ref)
    e_torch = max_err(torch_lowp, ref)
    assert e_got <= 2 * e_torch + floor, f"{what}: kernel error {e_got:.3g} > 2 x torch's {e_torch:.3g} (+{floor:g})"


def assert_close_fp32(ours: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5):
    """fp32 parity between two implementations of the same fp32 math: max error within ``rel`` of the
    reference's magnitude (the SD1 model tests' rule)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"
