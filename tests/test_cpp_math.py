"""Builds and runs the C++ unit tests of the shared per-element math headers (CMakeLists.txt, ctest).

They check bf16 rounding bit-exactly, the sampler step, gelu/erf/exp, the norm gradients and the timestep
embedding's argument rounding against long-double closed forms, without torch (tests/cpp/test_math.cpp).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake and a C++ compiler are needed to build the C++ math tests")
def test_cpp_math_headers(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), *gen],
                ["cmake", "--build", str(build)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "100% tests passed" in r.stdout, r.stdout
