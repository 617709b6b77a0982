"""What this machine and this build of fastdiff can do: versions, CPU features, op x backend table."""
from __future__ import annotations

import platform

import torch

__all__ = ["cpu_features", "info_text"]

# The CPU features that decide which kernels can run fast here (bf16 conversions, AVX-512, AMX tiles).
_INTERESTING = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
                "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16")


def cpu_features() -> tuple[str, list[str]]:
    """(model name, the interesting feature flags present) read from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in _INTERESTING if f in flags]


def info_text() -> str:
    from fastdiff import _ext
    from fastdiff.ops import all_ops
    from fastdiff.ops.registry import PRIORITY

    lines = [f"fastdiff {__import__('fastdiff').__version__}",
             f"python {platform.python_version()}  torch {torch.__version__}  "
             f"(CUDA build: {torch.version.cuda or 'no'}; device visible: {torch.cuda.is_available()})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    model, feats = cpu_features()
    lines.append(f"CPU: {model}; {torch.get_num_threads()} torch threads; torch CPU capability "
                 f"{torch.backends.cpu.get_cpu_capability()}")
    lines.append(f"CPU features: {' '.join(feats) or 'none of interest'}")
    if _ext.C is None:
        lines.append(f"compiled extension: NOT available ({_ext.IMPORT_ERROR}); running on the references")
    else:
        lines.append(f"compiled extension: fastdiff._C, CPU kernels dispatch to {_ext.cpu_capability()}, "
                     f"CUDA kernels {'built' if _ext.has_cuda_kernels() else 'not built'}")
    lines.append("")
    lines.append("op x backend (yes = can run here; otherwise why not):")
    ops = all_ops()
    width = max(len(n) for n in ops) if ops else 10
    for name in sorted(ops):
        avail = ops[name].availability()
        for i, backend in enumerate(PRIORITY):
            why = avail[backend]
            status = "yes" if not why else "no: " + "; ".join(why)
            lines.append(f"  {name if i == 0 else '':<{width}}  {backend:<10}  {status}")
    return "\n".join(lines)
