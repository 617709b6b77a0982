"""RMSNorm (diffusers semantics) on every available backend: reference, diffusers' RMSNorm, gradients, module."""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import RMSNorm, rms_norm, rms_norm_ref
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

OP = all_ops()["rms_norm"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# SD3 q/k norm: (B, heads, L, head_dim 64); plus hidden-size rows, odd sizes and D = 1.
SHAPES = [(2, 3, 16, 64), (1, 24, 8, 64), (2, 8, 1536), (3, 5, 7), (9, 33), (4, 1)]


def _inputs(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.randn(d, generator=g) + 1).to(dtype) if "w" in affine else None
    b = torch.randn(d, generator=g).to(dtype) if "b" in affine else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, eps):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    it = iter(leaves)
    xx = next(it)
    ww = next(it) if w is not None else None
    bb = next(it) if b is not None else None
    y = fn(xx, (x.shape[-1],), ww, eps, bias=bb)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["w", "wb", "none"])
def test_fp32_forward_and_backward(backend, shape, affine):
    x, w, b, dy = _inputs(shape, torch.float32, affine)
    with ops.use_backend(backend):
        y, grads = _run(rms_norm, x, w, b, dy, 1e-6)
    yd, gd = _run(rms_norm_ref, *(None if t is None else t.double() for t in (x, w, b, dy)), 1e-6)
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, gd):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 16, 64), (2, 8, 1536), (3, 5, 7)])
@pytest.mark.parametrize("affine", ["w", "none"])
def test_bf16_within_twice_torch(backend, lowp_dtype, shape, affine):
    x, w, b, dy = _inputs(shape, lowp_dtype, affine, seed=3)
    with ops.use_backend(backend):
        y, grads = _run(rms_norm, x, w, b, dy, 1e-6)
    y32, g32 = _run(rms_norm_ref, *(None if t is None else t.float() for t in (x, w, b, dy)), 1e-6)
    yt, gt = _run(rms_norm_ref, x, w, b, dy, 1e-6)  # diffusers' sequence in that dtype (torch's own ops)
    assert_close_lowp(y, y32, yt, f"{backend} forward", floor=1e-6)
    for name, got, ref, tor in zip(("dx", "dw"), grads, g32, gt):
        assert_close_lowp(got, ref, tor, f"{backend} {name}", floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_matches_diffusers_rmsnorm(backend, dtype):
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    torch.manual_seed(0)
    for kw in (dict(), dict(elementwise_affine=False), dict(bias=True)):
        ref = DiffusersRMSNorm(64, eps=1e-6, **kw)
        mine = RMSNorm(64, eps=1e-6, **kw)
        assert mine.state_dict().keys() == ref.state_dict().keys()
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        mine.load_state_dict(ref.state_dict(), strict=True)
        ref.to(dtype)
        mine.to(dtype)
        x = torch.randn(2, 4, 10, 64).to(dtype)
        with ops.use_backend(backend):
            got = mine(x)
        want = ref(x)
        assert got.dtype == want.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            ref32 = DiffusersRMSNorm(64, eps=1e-6, **kw)
            ref32.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
            assert_close_lowp(got, ref32(x.float()), want, f"{backend} {kw}")


def test_dtype_semantics_follow_diffusers():
    """bf16 input with an fp32 weight gives fp32 (diffusers); weightless keeps the input dtype."""
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    x = torch.randn(2, 5, 64).bfloat16()
    ref, mine = DiffusersRMSNorm(64, eps=1e-6), RMSNorm(64, eps=1e-6)
    got, want = mine(x), ref(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert rms_norm(x, 64, None, 1e-6).dtype == torch.bfloat16
    assert OP.select(x, (64,), mine.weight, 1e-6) == "ref"  # mixed dtypes stay on the reference


def test_non_contiguous_empty_nan(backend):
    x = torch.randn(2, 24, 10, 64).transpose(1, 2)  # (B, L, heads, D) view as attention code makes it
    w = torch.randn(64)
    with ops.use_backend(backend):
        torch.testing.assert_close(rms_norm(x, 64, w, 1e-6), rms_norm_ref(x.contiguous(), (64,), w, 1e-6),
                                   rtol=1e-5, atol=1e-5)
        assert rms_norm(torch.empty(0, 3, 64), 64, w, 1e-6).shape == (0, 3, 64)
        z = rms_norm(torch.zeros(2, 64), 64, w, 1e-6)  # all-zero row: 0 * rsqrt(eps) = 0, finite
        xn = torch.randn(2, 8)
        xn[1, 2] = float("nan")
        out = rms_norm(xn, 8, None, 1e-6)
    assert (z == 0).all()
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_bad_input_and_default_eps():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="does not end in normalized_shape"):
        rms_norm(x, 7)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, 8, torch.ones(4))
    with pytest.raises(TypeError, match="floating point"):
        rms_norm(torch.ones(2, 8, dtype=torch.int32), 8)
    # eps=None is torch.finfo(dtype).eps, as F.rms_norm.
    torch.testing.assert_close(rms_norm(x, 8), torch.nn.functional.rms_norm(x, (8,)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
def test_opcheck():
    xs = torch.randn(3, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.rms_norm_fwd, (xs, torch.randn(16, requires_grad=True), None, 1e-6))
    torch.library.opcheck(torch.ops.fastdiff.rms_norm_fwd,
                          (xs, torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True), 1e-6))
