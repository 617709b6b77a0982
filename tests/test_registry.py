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


def test_without_compiled_extension(tmp_path):
    """A checkout whose extension cannot import still works on the references; the cpu paths that are torch's
    own (SDPA attention, oneDNN conv/linear) stay available, and the ones that need fastdiff._C say why."""
    script = tmp_path / "no_ext.py"
    script.write_text(
        "import sys, warnings\n"
        "sys.modules['fastdiff._C'] = None  # makes `from fastdiff import _C` raise ImportError\n"
        "import torch, torch.nn.functional as F\n"
        "import fastdiff.ops as ops\n"
        "from fastdiff import _ext\n"
        "assert _ext.C is None and 'fastdiff._C' in _ext.IMPORT_ERROR\n"
        "table = {n: op.availability() for n, op in ops.all_ops().items()}\n"
        "for n in ('attention', 'conv2d', 'linear'):\n"
        "    assert table[n]['cpu'] == [], (n, table[n]['cpu'])\n"
        "assert 'fastdiff._C did not import' in table['group_norm']['cpu'][0]\n"
        "x = torch.randn(2, 8, 5, 5)\n"
        "y = ops.group_norm(x, 4, silu=True)\n"
        "ops.group_norm(x, 4)\n"
        "assert torch.allclose(y, F.silu(F.group_norm(x, 4)), atol=1e-5)\n"
        "q = torch.randn(1, 2, 7, 16)\n"
        "assert torch.allclose(ops.attention(q, q, q), F.scaled_dot_product_attention(q, q, q), atol=1e-5)\n"
    )
    out = subprocess.run([sys.executable, "-W", "always", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("could not be imported") == 1, out.stderr  # said once


def test_backend_checks_are_cached_but_follow_the_environment(monkeypatch):
    from fastdiff.ops import registry

    calls = []
    registry.register_backend_check("flash_attn", lambda: calls.append(1) or ["probe"])
    try:
        assert registry.backend_reasons("flash_attn") == ["probe"]
        assert registry.backend_reasons("flash_attn") == ["probe"]
        assert len(calls) == 1  # cached
        monkeypatch.setenv("TRITON_INTERPRET", "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1")
        registry.backend_reasons("flash_attn")
        assert len(calls) == 2  # a variable the checks read changed: re-run
    finally:
        from fastdiff.ops import _backends

        registry.register_backend_check("flash_attn", _backends._flash_attn_check)


def test_slower_backend_is_skipped_only_by_automatic_choice():
    op = Op(f"_probe_{len(ops.all_ops())}")
    op.register("ref")(lambda x: "ref")
    op.register("cpu", lambda x: [], needs_backend=False, slower=lambda x: "tiny" if x.numel() < 4 else None)(
        lambda x: "cpu")
    assert op(torch.zeros(8)) == "cpu"
    assert op(torch.zeros(2)) == "ref" and op.why_skipped("cpu", torch.zeros(2)) == "tiny"
    with ops.use_backend("cpu"):
        assert op(torch.zeros(2)) == "cpu"  # a forced backend still runs what it can


def test_conv_and_linear_routing_follows_measurements():
    """fp32 convolutions/linears with nothing to fuse and tiny matmuls go to eager torch (measured ties/losses
    in benchmarks/bench_conv_block.py); fused and bf16 ones take the oneDNN path."""
    conv, lin = ops.all_ops()["conv2d"], ops.all_ops()["linear"]
    x, w = torch.randn(2, 64, 16, 16), torch.randn(64, 64, 3, 3)
    args = (None, (1, 1), (1, 1), (1, 1), 1)
    assert conv.select(x, w, *args, None, False, None) == "ref"
    if not conv.reasons("cpu", x, w, *args, x, False, None):
        assert conv.select(x, w, *args, x, False, None) == "cpu"
        assert conv.select(x.bfloat16(), w.bfloat16(), *args, None, False, None) == "cpu"
    a, wl = torch.randn(512, 640), torch.randn(640, 640)
    assert lin.select(a, wl, None, None, None, None) == "ref"
    assert lin.select(a[:2, :320], wl[:, :320], None, "silu", None, None) == "ref"  # tiny
    if not lin.reasons("cpu", a, wl, None, "silu", None, None):
        # fp32 + a fused activation: oneDNN's post-op lost to F.linear + the activation on AVX2-only CPUs (Zen 3)
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        assert lin.select(a, wl, None, "silu", None, None) == ("cpu" if avx512 else "ref")
        assert avx512 or "AVX2-only" in lin.why_skipped("cpu", a, wl, None, "silu", None, None)
        assert lin.select(a, wl, None, None, a, None) == "cpu"  # the fused residual add
        assert lin.select(a.bfloat16(), wl.bfloat16(), None, None, None, None) == "cpu"
        assert lin.select(a.bfloat16(), wl.bfloat16(), None, "silu", None, None) == "cpu"


def test_info_roofline_is_labelled_and_follows_the_closed_form():
    """`fastdiff info --roofline`: estimates, labelled as such; a memory-bound row's time is bytes / 716.8 GB/s,
    a compute-bound row's is FLOPs / 97.5 TFLOP/s (the RTX 4080's datasheet figures)."""
    out = subprocess.run([sys.executable, "-m", "fastdiff", "info", "--roofline"], capture_output=True, text=True,
                         check=True).stdout
    assert "Roofline estimate (not a measurement)" in out
    rows = [line.split() for line in out.splitlines() if line.endswith(("memory", "compute"))]
    assert rows
    for cols in rows:
        gflop, mb, est_us, bound = float(cols[-5]), float(cols[-4]), float(cols[-2]), cols[-1]
        mem_us, flop_us = mb * 1e6 / 716.8e9 * 1e6, gflop * 1e9 / 97.5e12 * 1e6
        assert est_us == pytest.approx(max(mem_us, flop_us), rel=0.02, abs=0.06)
        assert bound == ("memory" if mem_us >= flop_us else "compute")
