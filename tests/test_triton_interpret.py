"""Run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (cases in tests/triton_interpret_cases.py).

TRITON_INTERPRET must be set before triton is imported, and the rest of the suite must not see it, so the
cases run in a child pytest process; a failure there fails this test with the child's report.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ["attention", "sampler_step", "group_norm"]


@pytest.mark.parametrize("group", GROUPS)
def test_triton_kernels_under_interpreter(group):
    cases = os.path.join(HERE, "triton_interpret_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTDIFF_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", cases, "-q", "-x", "-p", "no:cacheprovider",
                           "-k", group], cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode == 5:   # no case selected: this kernel group has no cases yet
        pytest.fail(f"no interpreter cases for {group}")
    assert proc.returncode == 0, f"interpreter cases for {group} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
