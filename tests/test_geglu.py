"""GEGLU on every available backend against its reference, diffusers' GEGLU and the low-precision rule."""
import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import geglu, geglu_ref
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

OP = all_ops()["geglu"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# SD1 transformer feed-forward: dim 320/640/1280, inner 4*dim, GEGLU input 2*inner; few tokens keep tests fast.
SHAPES = [(2, 8, 2560), (1, 4, 5120), (1, 2, 10240), (3, 5, 14), (7, 66), (1, 2)]


def _x(shape, dtype, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_backward(backend, shape):
    x = _x(shape, torch.float32).requires_grad_()
    g = _x(shape[:-1] + (shape[-1] // 2,), torch.float32, seed=1)
    with ops.use_backend(backend):
        y = geglu(x)
        (dx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    yd = geglu_ref(xd)
    (dxd,) = torch.autograd.grad(yd, xd, g.double())
    assert y.dtype == torch.float32 and y.shape == yd.shape
    # the project's rule in fp32 too: at most 2x the error of torch's own fp32 ops (a * F.gelu(g)) against fp64.
    # Both compute Phi(g) as (1 + erf(g / sqrt 2)) / 2, which cancels for g << 0, so the worst element of either
    # is a few 1e-6 wherever |a| and |dy| are large: a fixed absolute bound misses that scale.
    xt = x.detach().clone().requires_grad_()
    yt = geglu_ref(xt)
    (dxt,) = torch.autograd.grad(yt, xt, g)
    # plus 2 ulps of 1 (the inputs are O(1)): on a tensor of one or two outputs torch can happen to be ~exact
    assert_close_lowp(y, yd, yt, "geglu fp32 forward", floor=2 * 2.0 ** -23)
    assert_close_lowp(dx, dxd, dxt, "geglu fp32 backward", floor=2 * 2.0 ** -23)


@pytest.mark.parametrize("shape", [(2, 8, 2560), (1, 4, 10240), (3, 5, 14)])
def test_bf16_within_twice_torch(backend, lowp_dtype, shape):
    x = _x(shape, lowp_dtype).requires_grad_()
    g = _x(shape[:-1] + (shape[-1] // 2,), lowp_dtype, seed=1)
    with ops.use_backend(backend):
        y = geglu(x)
        (dx,) = torch.autograd.grad(y, x, g)
    x32 = x.detach().float().requires_grad_()
    y32 = geglu_ref(x32)
    (dx32,) = torch.autograd.grad(y32, x32, g.float())
    xt = x.detach().clone().requires_grad_()
    yt = geglu_ref(xt)  # torch's own ops in that dtype
    (dxt,) = torch.autograd.grad(yt, xt, g)
    assert_close_lowp(y, y32, yt.detach(), f"{backend} forward")
    assert_close_lowp(dx, dx32, dxt, f"{backend} backward")


def test_matches_diffusers_geglu(backend):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    m = GEGLU(32, 48)
    x = torch.randn(2, 5, 32)
    with ops.use_backend(backend):
        got = geglu(m.proj(x))
    torch.testing.assert_close(got, m(x), rtol=1e-5, atol=2e-6)


def test_non_contiguous_empty_nan(backend):
    base = _x((4, 6, 40), torch.float32)
    x = base[:, ::2, :]  # non-contiguous rows
    assert not x.is_contiguous()
    with ops.use_backend(backend):
        torch.testing.assert_close(geglu(x), geglu_ref(x.contiguous()), rtol=1e-5, atol=2e-6)
        assert geglu(torch.empty(0, 8)).shape == (0, 4)
        xn = torch.zeros(1, 4)
        xn[0, 0] = float("nan")  # value half of column 0
        out = geglu(xn)
    assert out[0, 0].isnan() and not out[0, 1].isnan()


def test_bad_inputs():
    with pytest.raises(ValueError, match="must be even"):
        geglu(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        geglu(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a tensor"):
        geglu([1.0, 2.0])


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
def test_cpu_refuses_fp16_and_opcheck():
    x = torch.randn(2, 8, dtype=torch.float16)
    with ops.use_backend("cpu"):
        with pytest.raises(ops.BackendUnavailable, match="float16"):
            geglu(x)
    assert OP.select(x) == "ref"
    # Schema, fake (meta) implementation and autograd registration are consistent (torch.compile relies on them).
    torch.library.opcheck(torch.ops.fastdiff.geglu, (torch.randn(3, 10, requires_grad=True),))
    torch.library.opcheck(torch.ops.fastdiff.geglu_backward, (torch.randn(3, 5), torch.randn(3, 10)))


def test_gelu_is_exact_erf_form():
    # The reference must use the erf gelu (diffusers' GEGLU calls F.gelu without approximate).
    x = torch.linspace(-4, 4, 101).repeat(1, 2)
    a, g = x.chunk(2, -1)
    torch.testing.assert_close(geglu(x), a * 0.5 * g * (1 + torch.erf(g / 2 ** 0.5)), rtol=1e-5, atol=2e-6)
    assert (geglu(x) - a * F.gelu(g, approximate="tanh")).abs().max() > 1e-5
