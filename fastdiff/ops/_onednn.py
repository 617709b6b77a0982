"""What the oneDNN paths of torch (the ops inductor uses) can do on this CPU, shared by conv and linear.

``torch.ops.mkldnn._convolution_pointwise`` and ``torch.ops.mkldnn._linear_pointwise`` run a oneDNN
convolution / inner product with post-ops fused into the output write (a unary activation, or a binary add
of another tensor). They have no autograd formula; :mod:`fastdiff.ops.conv` and :mod:`fastdiff.ops.linear`
wrap them in autograd Functions whose backward is the standard convolution / matmul backward.

The bf16 math policy. A bf16 model wants bf16 activations in memory, but which precision the multiply-adds
should run in depends on the CPU: where bf16 dot products run faster than fp32 FMA (AMX, or AMD's AVX512-BF16)
oneDNN's native bf16 kernels are the fast path; elsewhere (AVX512-BF16 at the fp32 rate, or bf16 emulated) the
cpu backends upcast bf16 operands to fp32, run the fp32 oneDNN kernel and round the result to bf16 once. That
is also more accurate than the bf16 kernel (one rounding at the end), so it stays inside the low-precision
test rule. Which CPU gets which is a row of the routing table (:mod:`fastdiff.ops.routing`, with the
benchmarks behind each row); the ``cpu_bf16_math`` setting (``FASTDIFF_CPU_BF16_MATH=native|fp32``) overrides
it. Where oneDNN has no bf16 kernels at all (AVX2-only CPUs: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
is False, and a bf16 primitive cannot even be created) native bf16 math falls back to fp32 (with a warning
when ``native`` was asked for explicitly).
"""
from __future__ import annotations

import functools
import warnings

import torch

from fastdiff import settings
from fastdiff.ops._checks import device_dtype_reasons
from fastdiff.ops.routing import current_route

__all__ = ["CPU_DTYPES", "autocast_cast", "bf16_math_dtype", "onednn_has_bf16", "onednn_math_dtype", "onednn_reasons"]

CPU_DTYPES = (torch.float32, torch.bfloat16)  # no fp16: x86 CPUs have no fast fp16 matmul (~2 GFLOP/s measured)


@functools.lru_cache(maxsize=None)
def onednn_has_bf16() -> bool:
    """True when oneDNN can build bf16 convolution / inner-product primitives on this CPU at all."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


@functools.lru_cache(maxsize=None)
def _warn_no_native_bf16() -> None:
    warnings.warn("FASTDIFF_CPU_BF16_MATH=native: oneDNN has no bf16 kernels on this CPU (no AVX512-BF16 / AMX); "
                  "bf16 convolutions and linears compute in fp32 instead", RuntimeWarning, stacklevel=3)


def bf16_math_dtype() -> torch.dtype:
    """The bf16 math policy (bf16 or fp32): the ``cpu_bf16_math`` setting, else the routing table's row.

    Attention follows it as is (torch's bf16 SDPA runs on any CPU); conv/linear ask
    :func:`onednn_math_dtype`, which also knows whether oneDNN has bf16 kernels here.
    """
    choice = settings.current().cpu_bf16_math
    if choice == "auto":
        choice = current_route().bf16_math
    return torch.bfloat16 if choice == "native" else torch.float32


def onednn_math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a oneDNN conv/linear computes ``dtype`` inputs in: the bf16 policy, except that a CPU whose
    oneDNN has no bf16 kernels computes in fp32 (with a warning when native bf16 was asked for)."""
    if dtype != torch.bfloat16:
        return dtype
    math = bf16_math_dtype()
    if math == torch.bfloat16 and not onednn_has_bf16():
        if settings.current().cpu_bf16_math == "native":  # asked for explicitly (not by the routing row)
            _warn_no_native_bf16()
        return torch.float32
    return math


@functools.lru_cache(maxsize=None)
def _mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def onednn_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Reasons the oneDNN pointwise ops cannot run these tensors (device, dtype, oneDNN present, empty)."""
    out = device_dtype_reasons("cpu", *tensors, dtypes=CPU_DTYPES)
    if not _mkldnn_available():
        out.append("torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)")
    if not torch.backends.mkldnn.enabled:
        out.append("oneDNN is disabled (torch.backends.mkldnn.enabled is False)")
    if any(t is not None and t.numel() == 0 for t in tensors):
        out.append("empty tensor: oneDNN is not called on empty inputs (the reference returns the empty result)")
    return out


def autocast_cast(x: torch.Tensor, *others: torch.Tensor | None) -> tuple:
    """Apply autocast's rule for conv/linear by hand: under ``torch.autocast`` on x's device, cast x and the
    other floating tensors (weight, bias, residual) to the autocast dtype, as ``F.conv2d`` / ``F.linear``
    would (both are on autocast's lower-precision list). Outside autocast the tensors are returned as given.

    Needed because the oneDNN pointwise ops have no autocast kernel: without this a module with fp32 weights
    would receive bf16 activations under autocast and fail the same-dtype check.
    """
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return (x,) + others
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
                 for t in (x,) + others)
