"""Build fastdiff and its one compiled extension, ``fastdiff._C``.

This file owns every compile flag (CMakeLists.txt only builds the C++ unit tests of the shared math
headers and takes no part in the package build).

- C++ CPU kernels are always built. ISA-specific kernels are compiled for several instruction sets in one
  binary (``#pragma GCC target`` per file, see csrc/cpu/isa/) and chosen at run time from the CPU's
  features, so the build is portable: no ``-march=native``.
- CUDA kernels are built as well when torch is a CUDA build and nvcc exists. ``FASTDIFF_BUILD_CUDA=0`` forces
  them off, ``=1`` forces them on (and fails loudly if it cannot). No GPU is needed to build.
- CUDA targets: ``TORCH_CUDA_ARCH_LIST`` when set (torch's syntax: ``"8.6"``, ``"8.9;9.0+PTX"``, ``"Ampere"``),
  else :data:`DEFAULT_CUDA_ARCHS`. The machine code and PTX actually built are recorded in the extension
  (``fastdiff._C.cuda_archs()``), and dispatch declines the CUDA kernels on a GPU they cannot run on.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Machine code for A100 (sm_80), RTX 30xx (sm_86), RTX 40xx (sm_89) and H100 (sm_90), plus compute_90 PTX that
# the driver compiles at first use on newer GPUs (Blackwell). Build time: see README ("How the kernels are built").
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _cuda_home() -> str:
    """CUDA_HOME, else CUDA_PATH, else /usr/local/cuda when it holds nvcc, else the folder above the bin/ of the
    nvcc on PATH (a toolkit installed elsewhere, e.g. /usr/local/cuda-13.0): the toolkit torch will compile with."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is not None and os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include",
                                                        "cuda_runtime.h")):
        return os.path.dirname(os.path.dirname(nvcc))
    return "/usr/local/cuda"


def _nvcc() -> str | None:
    nvcc = os.path.join(_cuda_home(), "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else shutil.which("nvcc")


def _nvcc_release(nvcc: str) -> str | None:
    """"13.0" from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88"); None if unreadable."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _want_cuda() -> bool:
    """Whether to build the CUDA kernels. torch compiles an extension only with an nvcc of the CUDA major version
    torch itself was built with (a CUDA 12 torch refuses nvcc 13): on a mismatch the default build makes the C++
    CPU kernels alone and says why; FASTDIFF_BUILD_CUDA=1 turns every reason into an error."""
    import torch

    flag = os.environ.get("FASTDIFF_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    nvcc = _nvcc()
    why = None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None:
        why = "no nvcc (put it on PATH or set CUDA_HOME)"
    else:
        release = _nvcc_release(nvcc)
        if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
            why = (f"{nvcc} is CUDA {release} but torch {torch.__version__} was built with CUDA {torch.version.cuda}, "
                   f"and torch compiles extensions only with an nvcc of the same major version: set CUDA_HOME to a "
                   f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit")
    if flag in ("1", "true", "yes", "on"):
        if why:
            raise RuntimeError(f"FASTDIFF_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
        return True
    if why and torch.version.cuda is not None and nvcc is not None:
        print(f"fastdiff: building the C++ CPU kernels only: {why}", file=sys.stderr)
    return why is None


def _cuda_arch_flags() -> tuple[list[str], str, str]:
    """nvcc ``-gencode`` flags for TORCH_CUDA_ARCH_LIST (torch's own parser), and the SASS and PTX targets they
    name as "_"-separated lists ("80_86_89_90", "90") for the extension to record (nvcc splits -D values at
    commas). Passing the flags explicitly keeps what is compiled and what is recorded the same list."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    flags = _get_cuda_arch_flags()
    sass, ptx = [], []
    for f in flags:
        m = re.fullmatch(r"-gencode=arch=compute_(\w+),code=(sm|compute)_(\w+)", f)
        if m is None:
            raise RuntimeError(f"unexpected CUDA arch flag from torch: {f!r}")
        (sass if m.group(2) == "sm" else ptx).append(m.group(3))
    key = lambda a: (int(re.match(r"\d+", a).group()), a)  # noqa: E731
    return flags, "_".join(sorted(set(sass), key=key)), "_".join(sorted(set(ptx), key=key))


def _extensions():
    with_cuda = _want_cuda()
    if with_cuda:
        # No GPU on a build box: torch needs an explicit arch list, and must not guess CUDA_HOME (it reads
        # both when torch.utils.cpp_extension is imported, so set them first).
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        if not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = _cuda_home()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cxx = ["-O3", "-ffast-math", "-fopenmp", "-std=c++20", "-Wall", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    libs_args = ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        arch_flags, sass, ptx = _cuda_arch_flags()
        macros = [("FASTDIFF_WITH_CUDA", "1"), ("FASTDIFF_CUDA_SASS", sass), ("FASTDIFF_CUDA_PTX", ptx)]
        return [CUDAExtension("fastdiff._C", sources, include_dirs=include_dirs, define_macros=macros,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc + arch_flags},
                              extra_link_args=libs_args)]
    return [CppExtension("fastdiff._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=libs_args)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"],
    package_dir={"fastdiff.kernels": "kernels"},
    package_data={"fastdiff": ["assets/*", "assets/**/*"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
