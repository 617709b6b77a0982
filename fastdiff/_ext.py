"""The one place that imports the compiled extension ``fastdiff._C``.

Its absence is a normal state (a source checkout that was never built, a build without a compiler):
fastdiff then runs on the pure-PyTorch references and says so once.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (the extension links against libtorch: import torch first)

from fastdiff import settings

__all__ = ["C", "IMPORT_ERROR", "has_cpu_kernels", "has_cuda_kernels", "cuda_archs", "cpu_capability"]

try:
    from fastdiff import _C as C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on how fastdiff was installed
    C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_warned = False


def warn_once() -> None:
    """Tell the user once that the compiled kernels are missing and the references are used."""
    global _warned
    if C is None and not _warned:
        _warned = True
        warnings.warn(
            "fastdiff._C (the compiled kernels) could not be imported, so fastdiff runs on its pure-PyTorch "
            f"reference ops ({IMPORT_ERROR}). Rebuild with `pip install -e . --no-build-isolation`; "
            "`fastdiff info` shows what is available.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_cpu_kernels() -> bool:
    return C is not None


def has_cuda_kernels() -> bool:
    return C is not None and bool(C.built_with_cuda())


def cuda_archs() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(sass, ptx)``: the GPU architectures the CUDA kernels were compiled to machine code for and to PTX for,
    e.g. ``(("80", "86", "89", "90"), ("90",))`` (sm_80 ... and compute_90); None without CUDA kernels (or from
    a stale build whose module has no record)."""
    if not has_cuda_kernels() or not hasattr(C, "cuda_archs"):
        return None
    got = C.cuda_archs()
    if got is None:
        return None
    sass, ptx = got
    return tuple(a for a in sass.split("_") if a), tuple(a for a in ptx.split("_") if a)


def cpu_capability() -> str:
    """The instruction set the C++ CPU kernels dispatch to ('avx512_bf16', 'avx512', 'avx2', 'scalar'): the
    best this CPU has, or the ``cpu_isa`` setting (``FASTDIFF_CPU_ISA``)."""
    if C is None:
        return "unavailable"
    settings.current()  # the settings are read (and the ISA applied) on first use
    return C.cpu_capability()


def _apply_cpu_isa(s: settings.Settings) -> None:
    # settings listener: the kernels dispatch to s.cpu_isa (None: the detected ISA); the extension refuses an
    # ISA this CPU lacks, and the settings then keep their previous value
    if C is None:
        return
    try:
        C.set_cpu_capability(s.cpu_isa or "auto")
    except ValueError as e:
        raise settings.SettingsError(str(e)) from None
    except AttributeError:  # an extension built from older sources: it follows only the detected ISA
        if s.cpu_isa is not None and s.cpu_isa != C.cpu_capability():
            raise settings.SettingsError("fastdiff._C predates the cpu_isa setting; rebuild it "
                                         "(pip install -e . --no-build-isolation)") from None


settings.on_change(_apply_cpu_isa)
