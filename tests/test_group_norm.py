"""GroupNorm (+ residual) (+ SiLU): every backend available here against an independent fp64 oracle.

The oracle (``_oracle``) is written from the definition (group mean and biased variance in float64), not with
F.group_norm. Tolerance rule: a backend's error against the oracle is at most 2x the error PyTorch's own eager
sequence makes in the same dtype (F.group_norm + F.silu, the broadcast add done first), plus a small floor for
fp32 where both errors are at rounding level. Gradients follow the same rule against fp64 autograd.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops import GroupNorm, group_norm, group_norm_ref, use_backend
from fastdiff.ops.group_norm import _op

from lowp import assert_close_lowp, max_err

OP = _op
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here

# (shape, groups): SD1 UNet channels (320/640/1280, 32 groups) and VAE channels (128/256/512) at small
# spatial sizes, plus odd ones: batch 1, C = 96 (3 channels a group), 6 channels in 3 groups, C = 40 and 24 (part
# of a channel block of the vector kernels), odd H/W, a single position, 3-D (B, C, L) input.
SHAPES = [
    ((2, 320, 8, 8), 32), ((1, 640, 4, 4), 32), ((2, 1280, 2, 3), 32), ((1, 128, 8, 8), 32),
    ((1, 256, 5, 5), 32), ((1, 512, 4, 4), 32), ((1, 96, 5, 7), 32), ((3, 6, 5, 3), 3), ((2, 6, 9), 3),
    ((1, 64, 1, 1), 32),
    ((2, 40, 3, 5), 8), ((2, 24, 7, 3), 4),
]
# (silu, residual kind): residual "chan" is (B, C) broadcast over positions (the ResBlock time embedding),
# "full" has x's shape.
MODES = [(False, None), (True, None), (True, "chan"), (False, "full"), (True, "full")]


def _oracle(x, g, w=None, b=None, eps=1e-5, silu=False, r=None):
    """fp64 GroupNorm from its definition (differentiable, for the gradient oracle)."""
    v = x.double()
    if r is not None:
        r = r.double()
        v = v + (r.reshape(r.shape[:2] + (1,) * (x.dim() - 2)) if r.shape != x.shape else r)
    B, C = v.shape[:2]
    vg = v.reshape(B, g, -1)
    mean = vg.mean(-1, keepdim=True)
    var = ((vg - mean) ** 2).mean(-1, keepdim=True)
    y = ((vg - mean) / torch.sqrt(var + eps)).reshape(v.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().reshape(shape)
    if b is not None:
        y = y + b.double().reshape(shape)
    return y * torch.sigmoid(y) if silu else y


def _torch_eager(x, g, w, b, eps, silu, r):
    """PyTorch's own op sequence in the input dtype: the error yardstick."""
    if r is not None:
        x = x + (r.reshape(r.shape[:2] + (1,) * (x.dim() - 2)) if r.shape != x.shape else r)
    y = F.group_norm(x, g, w, b, eps)
    return F.silu(y) if silu else y


def _layout(x, layout):
    if layout == "cl":  # C innermost in memory: torch.channels_last for 4-D, (B, L, C) storage for 3-D
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "noncontig":  # a strided view: every other element of a wider last dimension
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    return x.contiguous()


def _make(shape, dtype, layout, res, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(dtype)
    x = _layout(x, layout)
    C = shape[1]
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    b = (0.2 * torch.randn(C, generator=g)).to(dtype)
    r = None
    if res == "full":
        r = _layout(torch.randn(shape, generator=g).to(dtype), layout)
    elif res == "chan":
        r = torch.randn(shape[:2], generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, r, dy


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "noncontig"])
@pytest.mark.parametrize("silu,res", MODES, ids=[f"silu{int(s)}-{r}" for s, r in MODES])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_forward_and_gradients_match_oracle(backend, dtype, layout, silu, res, shape, groups):
    x, w, b, r, dy = _make(shape, dtype, layout, res, seed=sum(shape) + groups)
    eps = 1e-5
    # fastdiff
    xf, wf, bf, rf = _leaves(x, w, b, r)
    with use_backend(backend):
        y = group_norm(xf, groups, wf, bf, eps, silu=silu, residual=rf)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "cl" and x.dim() == 4 and backend == "cpu":
        assert y.is_contiguous(memory_format=torch.channels_last)  # layout kept, no hidden copy
    y.backward(dy)
    # oracle (fp64) and torch's own op in this dtype
    xo, wo, bo, ro = _leaves(*(t.double() if t is not None else None for t in (x, w, b, r)))
    yo = _oracle(xo, groups, wo, bo, eps, silu, ro)
    yo.backward(dy.double())
    xt, wt, bt, rt = _leaves(x, w, b, r)
    yt = _torch_eager(xt, groups, wt, bt, eps, silu, rt)
    yt.backward(dy)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert_close_lowp(y, yo, yt, "output", floor * max(1.0, yo.abs().max().item()))
    for name, a, o, t in (("dx", xf, xo, xt), ("dweight", wf, wo, wt), ("dbias", bf, bo, bt), ("dresidual", rf, ro, rt)):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        scale = max(1.0, o.grad.abs().max().item())
        # bf16 gradient floor: half a bf16 ulp of the largest gradient (torch may round a short sum exactly)
        gfloor = (1e-5 if dtype == torch.float32 else 2.0 ** -9) * scale
        assert_close_lowp(a.grad, o.grad, t.grad, name, gfloor)


def test_large_mean_is_accurate(backend):
    """|mean| >> std: the shifted per-channel sums keep fp32 statistics accurate (a naive E[x^2] - E[x]^2 in
    fp32 would lose every digit of the variance here)."""
    g = torch.Generator().manual_seed(1)
    x = 1000.0 + 0.01 * torch.randn(2, 64, 16, 16, generator=g)
    with use_backend(backend):
        y = group_norm(x, 32, silu=True)
    yo = _oracle(x.double(), 32, silu=True)
    yt = F.silu(F.group_norm(x, 32))
    assert_close_lowp(y, yo, yt, "large mean", 1e-4)


def test_fp16_on_cpu_runs_on_ref_and_matches():
    x = torch.randn(2, 64, 4, 4).half()
    assert _op.select(x, 32, None, None, 1e-5, silu=True) == "ref"
    y = group_norm(x, 32, silu=True)
    yo = _oracle(x.double(), 32, silu=True)
    yt = F.silu(F.group_norm(x.float(), 32)).half()
    assert_close_lowp(y, yo, yt, "fp16", 0.0)


@pytest.mark.skipif(not HAS_CPU, reason="compiled CPU kernels not built")
def test_cpu_backend_is_chosen_automatically():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 64, 4, 4, dtype=dtype)
        assert _op.select(x, 32, None, None, 1e-5, silu=True) == "cpu"


@pytest.mark.skipif(not HAS_CPU, reason="compiled CPU kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_isa_variant_matches_oracle(cpu_isa, dtype):
    """Every compiled ISA variant this CPU can run (settings.override(cpu_isa=...), the cpu_isa fixture) meets
    the low-precision rule against the fp64 oracle, forward and backward, in both layouts, with and without
    residual (96 channels and 5x7 positions exercise the vector tails)."""
    assert _ext.cpu_capability() == cpu_isa
    for cl in (False, True):
        for res in (None, "full", "chan"):
            x, w, b, r, dy = _make((2, 96, 5, 7), dtype, "cl" if cl else "nchw", res, seed=7)
            xf, wf = _leaves(x, w)
            with use_backend("cpu"):
                y = group_norm(xf, 32, wf, b, silu=True, residual=r)
            y.backward(dy)
            xo, wo = _leaves(x.double(), w.double())
            yo = _oracle(xo, 32, wo, b.double(), silu=True, r=None if r is None else r.double())
            yo.backward(dy.double())
            xt, wt = _leaves(x, w)
            yt = _torch_eager(xt, 32, wt, b, 1e-5, True, r)
            yt.backward(dy)
            what = f"{cpu_isa} {dtype} cl={cl} residual={res}"
            floor = (1e-5 if dtype == torch.float32 else 0.0) * max(1.0, yo.abs().max().item())
            assert_close_lowp(y, yo, yt, what + " output", floor)
            for name, a, o, t in (("dx", xf, xo, xt), ("dweight", wf, wo, wt)):
                gfloor = (1e-5 if dtype == torch.float32 else 2.0 ** -9) * max(1.0, o.grad.abs().max().item())
                assert_close_lowp(a.grad, o.grad, t.grad, f"{what} {name}", gfloor)


@pytest.mark.skipif(not HAS_CPU, reason="compiled CPU kernels not built")
def test_custom_op_registrations_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration are consistent (torch.compile relies on them)."""
    x = torch.randn(2, 64, 3, 5, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    rc = torch.randn(2, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.group_norm.default, (x, 32, w, b, None, rc, 1e-5, True))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.group_norm.default, (xl, 32, w, b, xl.detach() * 0.5, None, 1e-5, False))


def test_nan_poisons_only_its_group(backend):
    x = torch.randn(2, 64, 4, 4)
    x[1, 5, 2, 3] = float("nan")  # channel 5 is in group 2 (2 channels a group)
    with use_backend(backend):
        y = group_norm(x, 32, silu=True)
    bad = y.isnan().reshape(2, 32, -1)
    assert bad[1, 2].all()
    bad[1, 2] = False
    assert not bad.any()
    ok = torch.ones(2, 32, dtype=torch.bool)
    ok[1, 2] = False
    yo = _oracle(x.double(), 32, silu=True).reshape(2, 32, -1)
    assert max_err(y.reshape(2, 32, -1)[ok], yo[ok]) < 1e-5


def test_empty_batch_gives_empty_output_and_grad(backend):
    x = torch.randn(0, 64, 4, 4, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with use_backend("ref" if backend != "ref" else backend):  # empty input: the kernel backends decline it
        y = group_norm(x, 32, w, silu=True)
    assert y.shape == (0, 64, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(64))
    if backend == "cpu":
        with use_backend("cpu"), pytest.raises(Exception, match="empty input"):
            group_norm(x, 32, w)


def test_bad_input_is_rejected_clearly():
    x = torch.randn(2, 64, 4, 4)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        group_norm(x, 30)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        group_norm(x, 0)
    with pytest.raises(ValueError, match=r"\(B, C, \*\)"):
        group_norm(torch.randn(64), 32)
    with pytest.raises(TypeError, match="floating-point"):
        group_norm(torch.ones(2, 64, 4, 4, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="no positions"):
        group_norm(torch.randn(2, 64, 0, 4), 32)
    with pytest.raises(ValueError, match="weight must have shape"):
        group_norm(x, 32, torch.ones(32))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        group_norm(x, 32, residual=torch.randn(2, 64, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="weight must be"):
        group_norm(x.bfloat16(), 32, torch.ones(64, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        group_norm(x, 32, residual=torch.randn(2, 64, 4, 1))
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        group_norm(x, 32, torch.ones(64, device="meta"))
    with pytest.raises(TypeError, match="must be a tensor"):
        group_norm([1.0, 2.0], 1)


def test_module_is_a_drop_in_for_nn_groupnorm():
    torch.manual_seed(0)
    ref = nn.GroupNorm(32, 320, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = GroupNorm(32, 320, eps=1e-6)
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    mod.load_state_dict(ref.state_dict(), strict=True)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 320, 6, 6)
    for layout in ("nchw", "cl"):
        xx = _layout(x, layout)
        yo = _oracle(xx.double(), 32, ref.weight.detach(), ref.bias.detach(), 1e-6)
        assert_close_lowp(mod(xx), yo, ref(xx), f"module {layout}", 1e-5)
    # positional arguments and defaults as nn.GroupNorm, silu keyword-only, affine=False has no parameters
    plain = GroupNorm(8, 64, 1e-5, False)
    assert plain.weight is None and plain.bias is None and not list(plain.state_dict())
    act = GroupNorm(32, 320, eps=1e-6, silu=True)
    act.load_state_dict(ref.state_dict())
    yo = _oracle(x.double(), 32, ref.weight.detach(), ref.bias.detach(), 1e-6, silu=True)
    assert_close_lowp(act(x), yo, F.silu(ref(x)), "module silu", 1e-5)
    assert "silu=True" in repr(act)
    bf = GroupNorm(32, 320, eps=1e-6, dtype=torch.bfloat16)
    bf.load_state_dict(ref.state_dict())
    assert bf(x.bfloat16()).dtype == torch.bfloat16


def test_ref_matches_oracle_with_per_channel_residual_of_4d_shape():
    """residual (B, C, 1, 1) is the same as (B, C): the ResBlock passes temb[:, :, None, None]."""
    x = torch.randn(2, 64, 3, 3)
    t = torch.randn(2, 64)
    a = group_norm(x, 32, silu=True, residual=t)
    b = group_norm(x, 32, silu=True, residual=t[:, :, None, None])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(group_norm_ref(x, 32, silu=True, residual=t),
                               _oracle(x.double(), 32, silu=True, r=t.double()).float(), atol=1e-5, rtol=1e-5)


def test_cuda_kernels_are_built_when_cuda_torch_and_nvcc_exist():
    """A CUDA build regression (a .cu that stops compiling) must show up in CI even without a GPU."""
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    if torch.version.cuda is None or not nvcc or os.environ.get("FASTDIFF_BUILD_CUDA", "") in ("0", "false", "off"):
        pytest.skip("no CUDA torch or no nvcc: the CUDA kernels are not expected")
    assert _ext.has_cpu_kernels(), _ext.IMPORT_ERROR
    assert _ext.has_cuda_kernels(), "fastdiff._C was built without its CUDA kernels although torch and nvcc are CUDA-capable"
