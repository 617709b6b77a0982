"""Whole-backend availability checks, registered once with the dispatch registry."""
from __future__ import annotations

import functools
import importlib.util

import torch

from fastdiff import _ext, settings
from fastdiff.ops.registry import current_backend, register_backend_check

__all__ = ["triton_available", "triton_interpret", "tensor_reasons", "cuda_arch_runs", "cuda_device_reason"]


def _cpu_check() -> list[str]:
    if not _ext.has_cpu_kernels():
        return [f"the compiled extension fastdiff._C did not import ({_ext.IMPORT_ERROR})"]
    return []


def _arch_num(arch: str) -> tuple[int, int, str]:
    """"86" -> (8, 6, ""), "90a" -> (9, 0, "a"), "120" -> (12, 0, "")."""
    digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    major, minor = divmod(int(digits), 10)
    return major, minor, arch[len(digits):]


def cuda_arch_runs(capability: tuple[int, int], sass, ptx) -> bool:
    """Whether code built for ``sass`` (machine code) and ``ptx`` (e.g. ``("80", "86")``, ``("90",)``) runs on a
    GPU of compute ``capability`` (major, minor).

    CUDA's rules: machine code for X.y runs on X.z with z >= y (same major version; an arch-specific "a" build
    only on X.y itself); PTX for an architecture up to the GPU's is compiled by the driver at first use.
    """
    major, minor = capability
    for arch in sass:
        a_major, a_minor, suffix = _arch_num(arch)
        if a_major == major and (a_minor == minor if suffix == "a" else a_minor <= minor):
            return True
    for arch in ptx:
        a_major, a_minor, suffix = _arch_num(arch)
        if ((a_major, a_minor) == (major, minor)) if suffix == "a" else ((a_major, a_minor) <= (major, minor)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def cuda_device_reason(index: int) -> str | None:
    """Why fastdiff's CUDA kernels cannot run on GPU ``index`` (None: they can, or nothing to check).

    Cached per device: the kernels a build holds and a GPU's capability do not change while a process runs.
    """
    archs = _ext.cuda_archs()
    if archs is None or not torch.cuda.is_available():   # the whole-backend check says why
        return None
    sass, ptx = archs
    cap = torch.cuda.get_device_capability(index)
    if cuda_arch_runs(cap, sass, ptx):
        return None
    built = ", ".join(f"sm_{a}" for a in sass) + "".join(f" + PTX compute_{a}" for a in ptx)
    return (f"fastdiff._C was built for {built}; this GPU (cuda:{index}) is sm_{cap[0]}{cap[1]}: rebuild with "
            f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")


def _cuda_check() -> list[str]:
    out = []
    if not _ext.has_cuda_kernels():
        out.append(
            "fastdiff._C was built without CUDA kernels"
            if _ext.has_cpu_kernels()
            else f"the compiled extension fastdiff._C did not import ({_ext.IMPORT_ERROR})"
        )
    if not torch.cuda.is_available():
        out.append("no CUDA device is visible to torch")
    if not out:
        # The whole backend steps aside only when no visible GPU can run the kernels; on a machine with GPUs of
        # several kinds, the per-input check (ops/_checks.py) declines the tensors of an unsupported one.
        why = [cuda_device_reason(i) for i in range(torch.cuda.device_count())]
        if why and all(why):
            out.extend(why)
    return out


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when triton kernels run on CPU tensors through the interpreter (tests only)."""
    return settings.current().triton_interpret


def _triton_check() -> list[str]:
    if not triton_available():
        return ["triton is not installed"]
    if not torch.cuda.is_available() and not triton_interpret():
        return ["no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run kernels on CPU tensors)"]
    return []


def _flash_attn_check() -> list[str]:
    out = []
    if importlib.util.find_spec("flash_attn") is None:
        out.append("the flash-attn package is not installed (optional)")
    if not torch.cuda.is_available():
        out.append("no CUDA device is visible to torch")
    return out


def tensor_reasons(backend: str, *tensors: torch.Tensor | None, dtypes=None) -> list[str]:
    """Device and dtype reasons shared by every op of one backend.

    ``cpu`` runs CPU tensors, ``cuda`` and ``flash_attn`` CUDA tensors. ``triton`` runs CUDA tensors, and CPU
    tensors only under TRITON_INTERPRET=1 when triton is requested explicitly (the interpreter is for tests,
    never for an automatic choice). Every tensor must be on one device, index included: a kernel launched for
    ``cuda:0`` cannot read a weight on ``cuda:1``.
    """
    ts = [t for t in tensors if t is not None]
    out: list[str] = []
    devices = {str(t.device) for t in ts}
    if len(devices) > 1:
        out.append(f"tensors are on different devices ({', '.join(sorted(devices))})")
    dev = ts[0].device.type if ts else "cpu"
    if backend == "cpu" and dev != "cpu":
        out.append(f"tensors are on {dev}; the cpu backend runs CPU tensors")
    if backend in ("cuda", "flash_attn") and dev != "cuda":
        out.append(f"tensors are on {dev}; the {backend} backend runs CUDA tensors")
    if backend == "triton" and dev != "cuda":
        if not (dev == "cpu" and triton_interpret() and current_backend() == "triton"):
            out.append(f"tensors are on {dev}; triton runs CUDA tensors (CPU only under TRITON_INTERPRET=1, "
                       "when requested explicitly)")
    if dtypes is not None:
        bad = sorted({str(t.dtype) for t in ts if t.dtype not in dtypes})
        if bad:
            out.append(f"dtype {', '.join(bad)} is not supported (supported: "
                       f"{', '.join(str(d) for d in dtypes)})")
    return out


register_backend_check("cpu", _cpu_check)
register_backend_check("cuda", _cuda_check)
register_backend_check("triton", _triton_check)
register_backend_check("flash_attn", _flash_attn_check)
