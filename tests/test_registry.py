"""The dispatch registry: automatic choice, forced backends, the errors a forced backend gives."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdiff.ops as ops
from fastdiff import settings
from fastdiff.ops import routing
from fastdiff.ops._onednn import bf16_math_dtype
from fastdiff.ops.registry import Op, PRIORITY
from fastdiff.ops.routing import CpuCaps


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


def test_backend_setting_forces_backend():
    op = _probe_op()
    with settings.override(backend="ref"):
        assert op(torch.zeros(2))[0] == "ref"
        with ops.use_backend(None):  # the innermost choice wins
            assert op(torch.zeros(2))[0] == ("ref" if op.availability()["cpu"] else "cpu")
    with pytest.raises(settings.SettingsError, match=r"backend \(FASTDIFF_BACKEND\) must be one of .*got 'bogus'"):
        with settings.override(backend="bogus"):
            pass
    assert settings.current().backend is None


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


def test_backend_checks_are_cached_but_follow_the_settings():
    from fastdiff.ops import registry

    calls = []
    registry.register_backend_check("flash_attn", lambda: calls.append(1) or ["probe"])
    try:
        assert registry.backend_reasons("flash_attn") == ["probe"]
        assert registry.backend_reasons("flash_attn") == ["probe"]
        assert len(calls) == 1  # cached
        with settings.override(triton_interpret=not settings.current().triton_interpret):
            registry.backend_reasons("flash_attn")
        assert len(calls) == 2  # a setting the checks read changed: re-run
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


# The routing table's rules, for every capability class (pure logic: no such CPU needed).
CAPS_TO_ROW = [
    (CpuCaps("scalar"), "scalar"),
    (CpuCaps("avx2", vendor="AuthenticAMD"), "avx2"),
    (CpuCaps("avx2", vendor="GenuineIntel"), "avx2"),
    (CpuCaps("avx512", vendor="GenuineIntel"), "avx512"),
    (CpuCaps("avx512", vendor="AuthenticAMD"), "avx512"),
    (CpuCaps("avx512_bf16", vendor="GenuineIntel"), "avx512_bf16"),
    (CpuCaps("avx512_bf16", vendor="AuthenticAMD"), "avx512_bf16_2x"),
    (CpuCaps("avx512_bf16", amx=True, vendor="GenuineIntel"), "amx"),
    (CpuCaps("avx512", amx=True, vendor="GenuineIntel"), "amx"),
    (CpuCaps("avx2", amx=True, vendor="GenuineIntel"), "avx2"),  # cpu_isa lowered below AVX-512: no AMX route
]


@pytest.mark.parametrize("caps,row", CAPS_TO_ROW, ids=[f"{c.isa}-amx{int(c.amx)}-{c.vendor or 'any'}" for c, _ in CAPS_TO_ROW])
def test_route_name_for_each_capability(caps, row):
    assert routing.route_name(caps) == row


def test_every_row_is_reachable_and_cites_a_benchmark():
    assert set(routing.ROUTES) == set(settings.CPU_ROUTES) == {row for _, row in CAPS_TO_ROW}
    root = Path(__file__).resolve().parent.parent
    for name, route in routing.ROUTES.items():
        assert route.bf16_math in ("native", "fp32") and route.linear_activation in ("fused", "eager"), name
        assert route.evidence, f"row {name} cites no benchmark"
        assert not route.train_ref or route.train_evidence, f"row {name}: train_ref cites no benchmark"
        for entry in route.train_ref:
            op, _, dtype = entry.partition(":")
            assert op in ops.all_ops() and dtype in ("fp32", "bf16"), f"row {name}: bad train_ref entry {entry!r}"
        for ref in route.evidence + route.train_evidence:
            path, _, test_id = ref.partition("::")
            assert path.startswith("benchmarks/") and (root / path).is_file(), ref
            func = test_id.split("[")[0]
            assert f"def {func}(" in (root / path).read_text(), f"{ref}: no {func} in {path}"
    with pytest.raises(ValueError, match="CpuCaps.isa must be one of"):
        routing.route_name(CpuCaps("sse4"))


def test_cpu_isa_setting_lowers_the_route():
    for isa in settings.ISA_LEVELS:
        if routing.missing_features(isa):
            with pytest.raises(settings.SettingsError, match=f"cpu_isa={isa}"):
                with settings.override(cpu_isa=isa):
                    pass
            continue
        with settings.override(cpu_isa=isa):
            assert routing.current_route().name == routing.route_name(routing.detect_caps(isa))
            if isa in ("scalar", "avx2"):
                assert routing.current_route().name == isa


def test_missing_features_names_what_each_level_needs():
    assert routing.missing_features("avx2", frozenset({"avx2"})) == ["fma"]
    assert routing.missing_features("avx512_bf16", frozenset(routing.ISA_FEATURES["avx512"])) == ["avx512_bf16"]
    assert routing.missing_features("scalar", frozenset()) == []


LIN = ops.all_ops()["linear"]
CONV = ops.all_ops()["conv2d"]
_CONV_ARGS = (None, (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.skipif(bool(LIN.availability()["cpu"]) or bool(LIN.reasons("cpu", torch.zeros(4, 4), torch.zeros(4, 4),
                                                                           None, None, None, None)),
                    reason="torch has no oneDNN here")
@pytest.mark.parametrize("row", list(routing.ROUTES))
def test_linear_and_conv_follow_the_row(row):
    """What automatic choice does under each row: the row's rule, the measured machine-independent rules
    (tiny matmuls and plain fp32 linears / convolutions go to eager torch), and the bf16 math."""
    route = routing.ROUTES[row]
    a, wl = torch.randn(512, 640), torch.randn(640, 640)
    x, w = torch.randn(2, 64, 16, 16), torch.randn(64, 64, 3, 3)
    with settings.override(cpu_route=row):
        assert routing.current_route() is route
        # machine-independent: plain fp32 goes to eager torch; tiny matmuls too; fused or bf16 work to oneDNN
        assert LIN.select(a, wl, None, None, None, None) == "ref"
        assert LIN.select(a[:2, :320], wl[:, :320], None, "silu", None, None) == "ref"
        assert LIN.select(a, wl, None, None, a, None) == "cpu"
        assert LIN.select(a.bfloat16(), wl.bfloat16(), None, "silu", None, None) == "cpu"
        assert CONV.select(x, w, *_CONV_ARGS, None, False, None) == "ref"
        assert CONV.select(x, w, *_CONV_ARGS, x, False, None) == "cpu"
        assert CONV.select(x.bfloat16(), w.bfloat16(), *_CONV_ARGS, None, False, None) == "cpu"
        # the row's rule: fp32 linear + activation fused in oneDNN, or eager F.linear + the activation
        want = "cpu" if route.linear_activation == "fused" else "ref"
        assert LIN.select(a, wl, None, "silu", None, None) == want
        why = LIN.why_skipped("cpu", a, wl, None, "silu", None, None)
        assert (why is None) == (want == "cpu") and (why is None or f"routing row {row!r}" in why)
        # bf16 math: the row's, unless the cpu_bf16_math setting says otherwise
        assert bf16_math_dtype() == (torch.bfloat16 if route.bf16_math == "native" else torch.float32)
        for choice, dtype in (("fp32", torch.float32), ("native", torch.bfloat16)):
            with settings.override(cpu_bf16_math=choice):
                assert bf16_math_dtype() == dtype


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


GN = ops.all_ops()["group_norm"]
ATTN = ops.all_ops()["attention"]


@pytest.mark.skipif(bool(LIN.availability()["cpu"]), reason="torch has no oneDNN here")
@pytest.mark.parametrize("row", list(routing.ROUTES))
def test_training_follows_the_rows_train_ref(row):
    """With inputs that require grad, an op listed in the row's train_ref (for that dtype) runs ref, and says
    why citing the row; every other op and dtype, and the same inputs without grad, keep the inference choice."""
    route = routing.ROUTES[row]
    g = torch.Generator().manual_seed(0)
    calls = {
        "conv2d": (CONV, lambda t: (t(2, 64, 16, 16), t(64, 64, 3, 3), None, (1, 1), (1, 1), (1, 1), 1,
                                    t(2, 64, 16, 16), False, None)),
        "linear": (LIN, lambda t: (t(512, 640), t(640, 640), None, None, t(512, 640), None)),
        "attention": (ATTN, lambda t: (t(2, 4, 64, 32), t(2, 4, 64, 32), t(2, 4, 64, 32))),
    }
    if not GN.availability()["cpu"]:
        calls["group_norm"] = (GN, lambda t: (t(2, 64, 8, 8), 32, torch.ones(64, requires_grad=True),
                                              torch.zeros(64, requires_grad=True)))
    with settings.override(cpu_route=row):
        for name, (op, make) in calls.items():
            for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                def tensor(*shape, grad):
                    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)
                infer = op.select(*make(lambda *sh: tensor(*sh, grad=False)))
                args = make(lambda *sh: tensor(*sh, grad=True))
                listed = f"{name}:{dname}" in route.train_ref
                assert op.select(*args) == ("ref" if listed else infer), (row, name, dname)
                why = op.why_skipped("cpu", *args)
                assert (why is not None and f"routing row {row!r}" in why and "training" in why) == listed
                with torch.no_grad():
                    assert op.select(*args) == infer, (row, name, dname)


def test_sdpa_rule_sends_bf16_attention_to_sdpa_by_row():
    """A row with sdpa_bf16_min_keys / train_sdpa_bf16_min_keys runs torch SDPA for bf16 inference / training calls
    with that many keys, and fastdiff's kernel for everything else (fewer keys, fp32, a row without the setting)."""
    from fastdiff import _ext
    from fastdiff.ops.attention import kernel_loses

    def qk(keys, dtype=torch.bfloat16, grad=True):
        q = torch.zeros(1, 1, 4, 8, dtype=dtype, requires_grad=grad)
        return q, torch.zeros(1, 1, keys, 8, dtype=dtype, requires_grad=grad)

    checked = set()
    for name, route in routing.ROUTES.items():
        with settings.override(cpu_route=name):
            for training, n in ((True, route.train_sdpa_bf16_min_keys), (False, route.sdpa_bf16_min_keys)):
                if n is None:
                    assert routing.sdpa_reason(*qk(100_000, grad=training)) is None
                    continue
                checked.add(training)
                q, k = qk(n, grad=training)
                why = routing.sdpa_reason(q, k)
                assert why and f"routing row {name!r}" in why and ("training" if training else "inference") in why
                if _ext.has_cpu_kernels():   # else kernel_loses names the missing extension first
                    assert kernel_loses(q, k, k) == why
                assert routing.sdpa_reason(*qk(n, torch.float32, grad=training)) is None
                if n > 1:
                    assert routing.sdpa_reason(*qk(n - 1, grad=training)) is None
            # a call that requires grad under no_grad is inference
            with torch.no_grad():
                want = route.sdpa_bf16_min_keys is not None and 300 >= route.sdpa_bf16_min_keys
                assert (routing.sdpa_reason(*qk(300)) is not None) == want
    assert checked == {True, False}, "no routing row sends bf16 attention to SDPA in training and in inference"


def test_sdpa_bf16_upcast_threshold_follows_the_row():
    """Inference bf16 SDPA upcasts to fp32 from the row's score-matrix size on (never where it is None)."""
    import importlib

    attn = importlib.import_module("fastdiff.ops.attention")
    q = torch.zeros(1, 1, 2048, 8, dtype=torch.bfloat16)
    for name, route in routing.ROUTES.items():
        with settings.override(cpu_route=name), torch.no_grad():
            n = route.sdpa_bf16_upcast_min_scores
            assert attn._sdpa_bf16_upcast(q, q, q) == (n is not None and 2048 * 2048 >= n), name
