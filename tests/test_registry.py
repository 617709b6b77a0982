"""The dispatch registry: automatic choice, forced backends, the errors a forced backend gives."""
import os
import subprocess
import sys

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops.registry import Op, PRIORITY


def _probe_op():
    # A private op with two implementations that say what they ran, and a cpu one refusing bf16.
    name = f"_probe_{len(ops.all_ops())}"
    op = Op(name)
    op.register("ref")(lambda x: ("ref", x))
    op.register("cpu", lambda x: [] if x.dtype == torch.float32 else [f"dtype {x.dtype} unsupported"])(
        lambda x: ("cpu", x))
    return op


def test_automatic_choice_takes_first_backend_without_reasons():
    op = _probe_op()
    cpu_ok = not op.availability()["cpu"]
    assert op(torch.zeros(2))[0] == ("cpu" if cpu_ok else "ref")
    assert op(torch.zeros(2, dtype=torch.bfloat16))[0] == "ref"


def test_forced_backend_and_errors():
    op = _probe_op()
    with ops.use_backend("ref"):
        assert op(torch.zeros(2))[0] == "ref"
        assert ops.current_backend() == "ref"
    assert ops.current_backend() is None
    with ops.use_backend("cpu"):
        with pytest.raises(ops.BackendUnavailable) as err:
            op(torch.zeros(2, dtype=torch.bfloat16))
    assert "dtype torch.bfloat16 unsupported" in str(err.value)
    with ops.use_backend("triton"):
        with pytest.raises(ops.BackendUnavailable, match="no 'triton' implementation"):
            op(torch.zeros(2))
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("nonsense"):
            pass


def test_env_var_forces_backend(monkeypatch):
    op = _probe_op()
    monkeypatch.setenv("FASTDIFF_BACKEND", "ref")
    assert op(torch.zeros(2))[0] == "ref"
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        op(torch.zeros(2))


def test_every_op_has_a_reference_and_known_backends():
    for name, op in ops.all_ops().items():
        if name.startswith("_probe"):
            continue
        assert "ref" in op.impls, f"{name} has no pure-PyTorch reference"
        assert set(op.impls) <= set(PRIORITY)
        assert op.availability()["ref"] == []


def test_compiled_extension_is_built():
    """The installed package must carry its kernels: a silent fallback to the references would hide a
    broken build. CUDA kernels must be in it whenever torch is a CUDA build and nvcc exists."""
    from fastdiff import _ext

    assert _ext.C is not None, _ext.IMPORT_ERROR
    nvcc = os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if torch.version.cuda and nvcc and os.environ.get("FASTDIFF_BUILD_CUDA", "auto") != "0":
        assert _ext.has_cuda_kernels()


def test_info_command_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, check=True)
    for name in ops.all_ops():
        if not name.startswith("_probe"):
            assert name in out.stdout
    assert "torch " + torch.__version__ in out.stdout
