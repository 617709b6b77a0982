"""What the oneDNN paths of torch (the ops inductor uses) can do on this CPU, shared by conv and linear.

``torch.ops.mkldnn._convolution_pointwise`` and ``torch.ops.mkldnn._linear_pointwise`` run a oneDNN
convolution / inner product with post-ops fused into the output write (a unary activation, or a binary add
of another tensor). They have no autograd formula; :mod:`fastdiff.ops.conv` and :mod:`fastdiff.ops.linear`
wrap them in autograd Functions whose backward is the standard convolution / matmul backward.

The bf16 math policy. A bf16 model wants bf16 activations in memory, but which precision the multiply-adds
should run in depends on the CPU:

- AMX (Intel Sapphire Rapids and later, when the hypervisor exposes it) or AMD Zen 4/5 with AVX512-BF16:
  bf16 dot products run at 2x (or more) the fp32 FMA rate, so oneDNN's native bf16 kernels are the fast path
  (PLATFORM.md: ~940 GFLOP/s bf16 vs ~470 fp32 on a Zen 5).
- Intel AVX512-BF16 without AMX (Cooper Lake; Sapphire/Emerald Rapids guests without AMX): ``vdpbf16ps``
  issues on one port and does 2 products a lane, the same 64 FLOP/cycle as two ports of fp32 FMA, and
  oneDNN's bf16 convolutions measured 1.5-2x *slower* than fp32 here (benchmarks/bench_conv_block.py).
- No AVX512-BF16 at all: bf16 is emulated, far slower than fp32.

So on the last two classes the cpu backends upcast bf16 operands to fp32, run the fp32 oneDNN kernel and round
the result to bf16 once. That is also more accurate than the bf16 kernel (one rounding at the end), so it
stays inside the low-precision test rule. ``FASTDIFF_CPU_BF16_MATH=native|fp32`` overrides the choice; where
oneDNN has no bf16 kernels at all (AVX2-only CPUs such as AMD Zen 2/3: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
is False, and a bf16 primitive cannot even be created), ``native`` falls back to fp32 math with a warning.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from fastdiff.ops._checks import device_dtype_reasons

__all__ = ["CPU_DTYPES", "autocast_cast", "bf16_math_dtype", "cpu_vendor", "onednn_has_bf16", "onednn_math_dtype",
           "onednn_reasons", "native_bf16_is_fast"]

CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 runs at ~2 GFLOP/s on this class of CPU (PLATFORM.md)


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... from /proc/cpuinfo ('' when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def native_bf16_is_fast() -> bool:
    """True when oneDNN's bf16 kernels beat its fp32 kernels on this CPU (see the module doc)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    return cpu_vendor() == "AuthenticAMD" and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()


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
    """The bf16 math policy (bf16 or fp32; env override): what the cpu paths compute bf16 inputs in.

    Attention follows it as is (torch's bf16 SDPA runs on any CPU); conv/linear ask
    :func:`onednn_math_dtype`, which also knows whether oneDNN has bf16 kernels here.
    """
    choice = os.environ.get("FASTDIFF_CPU_BF16_MATH", "").strip().lower()
    if choice in ("native", "bf16"):
        return torch.bfloat16
    if choice in ("fp32", "float32"):
        return torch.float32
    if choice not in ("", "auto"):
        raise ValueError(f"FASTDIFF_CPU_BF16_MATH must be 'native', 'fp32' or 'auto', got {choice!r}")
    return torch.bfloat16 if native_bf16_is_fast() else torch.float32


def onednn_math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a oneDNN conv/linear computes ``dtype`` inputs in: the bf16 policy, except that a CPU whose
    oneDNN has no bf16 kernels computes in fp32 (with a warning when native bf16 was asked for)."""
    if dtype != torch.bfloat16:
        return dtype
    math = bf16_math_dtype()
    if math == torch.bfloat16 and not onednn_has_bf16():
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
