"""GPU-only behaviour checked without a GPU: which GPUs the CUDA build can run on, device indices in the
backend checks, the device and grids of every Triton launch, and the CUDA attention fallback.

CUDA tensors here are FakeTensors (``torch._subclasses.fake_tensor``): they carry a device such as ``cuda:1``
and shapes, and run torch's shape logic, but hold no memory and need no driver. The Triton kernels are
replaced by recorders that keep each launch's grid and the GPU that was current when it was launched.
"""
from __future__ import annotations

import importlib
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdiff.ops as ops
from fastdiff import _ext
from fastdiff.ops import _backends
from fastdiff.ops._backends import tensor_reasons
from fastdiff.ops._checks import CUDA_DTYPES, device_dtype_reasons
from fastdiff.ops.attention import attention_ref
from fastdiff.ops.registry import refresh_backends

DEFAULT_BUILD = (("80", "86", "89", "90"), ("90",))   # setup.py's DEFAULT_CUDA_ARCHS
attention_mod = importlib.import_module("fastdiff.ops.attention")   # the module (fastdiff.ops.attention is the op)


# ----------------------------------------------------------------------------------------------------------
# 1. Which GPUs a build runs on
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap,runs", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True),   # machine code for each
    ((8, 7), True),                                                     # sm_86 code runs on 8.7 (same major)
    ((12, 0), True), ((10, 0), True),                                   # compute_90 PTX, compiled by the driver
    ((7, 5), False), ((7, 0), False),                                   # older than every target
])
def test_default_build_runs_on(cap, runs):
    assert _backends.cuda_arch_runs(cap, *DEFAULT_BUILD) is runs


def test_arch_rules_edge_cases():
    cuda_arch_runs = _backends.cuda_arch_runs
    assert not cuda_arch_runs((8, 6), ("89",), ())        # machine code never runs on an older minor
    assert not cuda_arch_runs((9, 0), ("86", "89"), ())   # nor across major versions
    assert cuda_arch_runs((9, 0), ("90a",), ())           # arch-specific code on its own GPU
    assert not cuda_arch_runs((10, 0), ("90a",), ())      # ... only there
    assert cuda_arch_runs((8, 9), (), ("86",))            # PTX for an older arch is compiled for the GPU
    assert not cuda_arch_runs((8, 0), (), ("86",))        # never for a newer one


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend the extension holds ``DEFAULT_BUILD`` and torch sees GPUs of the capabilities in ``caps``."""
    caps = {}
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_ext, "cuda_archs", lambda: DEFAULT_BUILD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(caps))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[0 if i is None else i])
    _backends.cuda_device_reason.cache_clear()
    refresh_backends()
    yield caps
    _backends.cuda_device_reason.cache_clear()
    refresh_backends()


def test_cuda_backend_steps_aside_on_an_unsupported_gpu(fake_gpus):
    fake_gpus[0] = (7, 5)
    why = _backends._cuda_check()
    assert why == ["fastdiff._C was built for sm_80, sm_86, sm_89, sm_90 + PTX compute_90; this GPU (cuda:0) is "
                   "sm_75: rebuild with TORCH_CUDA_ARCH_LIST=7.5"]
    assert ops.all_ops()["group_norm"].availability()["cuda"] == why


def test_cuda_backend_runs_on_supported_gpus(fake_gpus):
    for cap in ((8, 6), (8, 0), (12, 0)):
        fake_gpus[0] = cap
        _backends.cuda_device_reason.cache_clear()
        refresh_backends()
        assert _backends._cuda_check() == [], cap


def test_mixed_gpus_are_judged_per_tensor(fake_gpus):
    fake_gpus.update({0: (8, 9), 1: (7, 5)})
    assert _backends._cuda_check() == []          # cuda:0 can run the kernels
    with FakeTensorMode():
        x0 = torch.empty(2, 8, device="cuda:0")
        x1 = torch.empty(2, 8, device="cuda:1")
    assert device_dtype_reasons("cuda", x0, dtypes=CUDA_DTYPES) == []
    why = device_dtype_reasons("cuda", x1, dtypes=CUDA_DTYPES)
    assert len(why) == 1 and "this GPU (cuda:1) is sm_75" in why[0]
    op = ops.all_ops()["geglu"]
    assert op.reasons("cuda", x0) == []
    assert any("sm_75" in r for r in op.reasons("cuda", x1))


def _built_so() -> str | None:
    return getattr(_ext.C, "__file__", None) if _ext.C is not None else None


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="fastdiff._C was built without CUDA kernels")
def test_recorded_archs_match_the_machine_code_in_the_extension():
    """What the extension says it holds is what cuobjdump finds in its fat binary."""
    import os

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump to read the extension's fat binary")
    sass, ptx = _ext.cuda_archs()
    so = _built_so()

    def listed(flag, kind):
        out = subprocess.run([cuobjdump, flag, so], capture_output=True, text=True, check=True).stdout
        import re

        return sorted(set(re.findall(rf"\.{kind}_(\w+)\.", out)))

    elf = listed("--list-elf", "sm")
    assert elf == sorted(sass), (elf, sass)
    assert listed("--list-ptx", "sm") == sorted(ptx)


# ----------------------------------------------------------------------------------------------------------
# 4. Device index in the backend checks
# ----------------------------------------------------------------------------------------------------------

def test_tensors_on_two_gpus_are_refused():
    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda:0")
        w = torch.empty(8, device="cuda:1")
        w0 = torch.empty(8, device="cuda:0")
    for backend in ("cuda", "triton", "flash_attn"):
        assert tensor_reasons(backend, x, w0) == []
        assert tensor_reasons(backend, x, w) == ["tensors are on different devices (cuda:0, cuda:1)"]
    assert device_dtype_reasons("cuda", x, w0, dtypes=CUDA_DTYPES) == []
    assert "tensors are on different devices (cuda:0, cuda:1)" in device_dtype_reasons("cuda", x, w, dtypes=CUDA_DTYPES)


# ----------------------------------------------------------------------------------------------------------
# 3, 4, 6. Every Triton launch: on the tensor's GPU, within CUDA's grid limits, enough programs to fill a GPU
# ----------------------------------------------------------------------------------------------------------

class _FakeCudaDevice:
    """Stands in for ``torch.cuda.device``: records which GPU is current (no driver here)."""
    current: list = []

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        _FakeCudaDevice.current.append(self.index)

    def __exit__(self, *exc):
        _FakeCudaDevice.current.pop()


class _Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cur = _FakeCudaDevice.current[-1] if _FakeCudaDevice.current else None
            self.log.append((self.name, tuple(grid), cur))
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Replace every Triton kernel of fastdiff.kernels by a recorder; returns the launch log."""
    pytest.importorskip("triton")
    from fastdiff.kernels import flash_attention, group_norm, sampler_step

    log = []
    for mod in (flash_attention, group_norm, sampler_step):
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                monkeypatch.setattr(mod, name, _Recorder(name, log))
    monkeypatch.setattr(group_norm, "sm_count", lambda device: 76, raising=False)
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    _FakeCudaDevice.current = []
    return log


def _assert_grids_within_limits(log):
    limits = (2 ** 31 - 1, 65535, 65535)
    for name, grid, _ in log:
        assert all(size <= lim for size, lim in zip(grid, limits)), f"{name}: grid {grid} exceeds {limits}"


def test_triton_launches_run_on_the_tensors_gpu(launches):
    from fastdiff.kernels.flash_attention import flash_attention_bwd, flash_attention_fwd
    from fastdiff.kernels.group_norm import group_norm_bwd, group_norm_fwd
    from fastdiff.kernels.sampler_step import sampler_step_triton

    with FakeTensorMode():
        dev = "cuda:1"
        x = torch.empty(2, 32, 8, 8, device=dev)
        w = torch.empty(32, device=dev)
        y, mean, rstd = group_norm_fwd(x, 8, w, w, 1e-5, True)
        group_norm_bwd(torch.empty_like(x), x, 8, w, w, mean, rstd, True)
        q = torch.empty(2, 4, 64, 40, device=dev, dtype=torch.bfloat16)
        out, lse = flash_attention_fwd(q, q, q)
        flash_attention_bwd(torch.empty_like(out), q, q, q, out, lse)
        lat = torch.empty(1, 4, 16, 16, device=dev)
        sampler_step_triton(lat, torch.empty(2, 4, 16, 16, device=dev), 0.5, 0.5, guidance_scale=3.0)
    names = {name for name, _, _ in launches}
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_sampler_step_kernel"} <= names
    assert len([n for n in names if n.startswith("_gn_")]) >= 2
    assert [(name, cur) for name, _, cur in launches if cur != 1] == []


def test_group_norm_grid_long_position_axis(launches):
    """64 channels per group and 2.2M positions (video latents): the position blocks used to be grid axis y."""
    from fastdiff.kernels.group_norm import group_norm_bwd, group_norm_fwd

    with FakeTensorMode():
        x = torch.empty(1, 64, 2_200_000, device="cuda:0", dtype=torch.bfloat16)
        y, mean, rstd = group_norm_fwd(x, 1)
        group_norm_bwd(torch.empty_like(x), x, 1, None, None, mean, rstd)
    assert launches
    _assert_grids_within_limits(launches)


def test_attention_grid_many_heads(launches):
    """B * H = 70,000 (heads of a large batch of short sequences) used to be grid axis y."""
    from fastdiff.kernels.flash_attention import flash_attention_bwd, flash_attention_fwd

    with FakeTensorMode():
        q = torch.empty(7000, 10, 16, 32, device="cuda:0", dtype=torch.float16)
        out, lse = flash_attention_fwd(q, q, q)
        flash_attention_bwd(torch.empty_like(out), q, q, q, out, lse)
    assert len(launches) >= 3
    _assert_grids_within_limits(launches)


def test_group_norm_reductions_fill_the_gpu_at_batch_1(launches):
    """A B = 1 VAE decode layer (512 channels, 32 groups, 128x128): its statistics and backward sums used to run
    one program per group, 32 programs for 76 SMs; now at least 4 per SM."""
    from fastdiff.kernels.group_norm import group_norm_bwd, group_norm_fwd

    with FakeTensorMode():
        x = torch.empty(1, 512, 128, 128, device="cuda:0", dtype=torch.bfloat16)
        w = torch.empty(512, device="cuda:0")
        y, mean, rstd = group_norm_fwd(x, 32, w, w, 1e-6, True)
        fwd = list(launches)
        group_norm_bwd(torch.empty_like(x), x, 32, w, w, mean, rstd, True)
        bwd = launches[len(fwd):]
    for what, log in (("forward", fwd), ("backward", bwd)):
        first = log[0]   # the reduction over the positions comes first
        programs = 1
        for size in first[1]:
            programs *= size
        assert programs >= 4 * 76, f"{what}: {first[0]} runs {programs} programs"


def test_position_splits():
    pytest.importorskip("triton")
    from fastdiff.kernels.group_norm import _MAX_SPLITS, _splits

    for groups, n, block_n, sms in ((32, 512 * 512, 128, 76), (32, 4096, 512, 76), (2, 1600, 512, 4),
                                    (4096, 64, 512, 132), (1, 10 ** 7, 32, 132), (64, 1, 16, 76)):
        s, chunk = _splits(groups, n, block_n, sms)
        assert 1 <= s <= _MAX_SPLITS and chunk % block_n == 0
        assert (s - 1) * chunk < n <= s * chunk, (groups, n, s, chunk)   # every chunk has positions, all covered
        tiles = -(-n // block_n)
        # whole tiles per chunk, equal chunks: at least half the programs asked for (4 per SM), tiles allowing
        assert 2 * groups * s >= min(4 * sms, groups * min(tiles, _MAX_SPLITS)), (groups, n, s)


# ----------------------------------------------------------------------------------------------------------
# 5. Attention on CUDA without triton or flash-attn: torch's SDPA, not the fp32 reference
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(_backends, "triton_available", lambda: False)
    refresh_backends()
    yield
    refresh_backends()


def test_cuda_attention_is_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert ops.all_ops()["attention"].availability()["cuda"] == ["no CUDA device is visible to torch"]


def test_cuda_attention_without_triton_is_sdpa(no_triton, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refresh_backends()
    op = ops.all_ops()["attention"]
    with FakeTensorMode():
        q = torch.empty(2, 8, 4096, 40, device="cuda:0", dtype=torch.float16)
        mask = torch.empty(2, 1, 1, 4096, device="cuda:0", dtype=torch.bool)
    assert op.select(q, q, q, None, None) == "cuda"
    assert op.select(q, q, q, mask, None) == "cuda"
    assert op.reasons("triton", q, q, q, None, None) == ["triton is not installed"]


def test_cuda_attention_prefers_triton_when_it_runs(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refresh_backends()
    try:
        op = ops.all_ops()["attention"]
        with FakeTensorMode():
            q = torch.empty(2, 8, 256, 64, device="cuda:0", dtype=torch.bfloat16)
            q160 = torch.empty(2, 8, 256, 160, device="cuda:0", dtype=torch.float32)
        assert op.select(q, q, q, None, None) == "triton"
        assert "triton flash attention runs this input" in op.why_skipped("cuda", q, q, q, None, None)
        assert op.select(q160, q160, q160, None, None) == "cuda"   # fp32 head dim 160: triton declines
    finally:
        monkeypatch.undo()
        refresh_backends()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_cuda_sdpa_path_matches_reference_with_fully_masked_rows(kind):
    """The CUDA SDPA wrapper's mask handling (run here on CPU tensors): fully masked query rows give 0 and zero
    gradients, the other rows match the reference, forward and backward."""
    g = torch.Generator().manual_seed(0)
    B, H, Lq, Lk, D = 2, 3, 33, 29, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    keep = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
    keep[0, :, 3] = False
    keep[1, :, 7:9] = False
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(B, 1, Lq, Lk, generator=g), float("-inf"))
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    r = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_mod._cuda_sdpa_attention(*a, mask, 0.3)
    ref = attention_ref(*r, mask, 0.3)
    assert torch.isfinite(out).all()
    assert (out[0, :, 3] == 0).all() and (out[1, :, 7:9] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    do = torch.randn(out.shape, generator=g)
    for name, ga, gr in zip("qkv", torch.autograd.grad(out, a, do), torch.autograd.grad(ref, r, do)):
        assert torch.isfinite(ga).all(), name
        torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
