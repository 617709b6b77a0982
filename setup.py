"""Build fastdiff and its one compiled extension, ``fastdiff._C``.

This file owns every compile flag (CMakeLists.txt only builds the C++ unit tests of the shared math
headers and takes no part in the package build).

- C++ CPU kernels are always built. ISA-specific kernels are compiled for several instruction sets in one
  binary (``#pragma GCC target`` per file, see csrc/cpu/isa/) and chosen at run time from the CPU's
  features, so the build is portable: no ``-march=native``.
- CUDA kernels are built as well when torch is a CUDA build and nvcc exists. ``FASTDIFF_BUILD_CUDA=0`` forces
  them off, ``=1`` forces them on (and fails loudly if it cannot). The default target is sm_89 (RTX 4080);
  ``TORCH_CUDA_ARCH_LIST`` overrides it. No GPU is needed to build.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    import torch

    flag = os.environ.get("FASTDIFF_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc")
                                    if os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) else None)
    possible = torch.version.cuda is not None and nvcc is not None
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                f"FASTDIFF_BUILD_CUDA=1 but CUDA kernels cannot be built: torch.version.cuda="
                f"{torch.version.cuda!r}, nvcc={nvcc!r}. Install the CUDA build of torch and the CUDA toolkit.")
        return True
    return possible


def _extensions():
    with_cuda = _want_cuda()
    if with_cuda:
        # No GPU on a build box: torch needs an explicit arch list, and must not guess CUDA_HOME (it reads
        # both when torch.utils.cpp_extension is imported, so set them first).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.9")
        if not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cxx = ["-O3", "-ffast-math", "-fopenmp", "-std=c++20", "-Wall", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    libs_args = ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        return [CUDAExtension("fastdiff._C", sources, include_dirs=include_dirs,
                              define_macros=[("FASTDIFF_WITH_CUDA", "1")],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=libs_args)]
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
