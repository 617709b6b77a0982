"""LayerNorm (last dim) on every available backend against F.layer_norm, forward and gradients; the module."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import LayerNorm, layer_norm
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

OP = all_ops()["layer_norm"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# SD1 transformer blocks (320/640/1280), SD3 MMDiT (1536), CLIP (768), odd sizes, 2-D input, D = 1.
SHAPES = [(2, 16, 320), (1, 8, 640), (2, 4, 1280), (1, 6, 1536), (3, 5, 7), (9, 33), (4, 1)]
AFFINE = ["wb", "w", "b", "none"]


def _inputs(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(dtype)
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
    y = fn(xx, (x.shape[-1],), ww, bb, eps)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_fp32_forward_and_backward(backend, shape, affine):
    x, w, b, dy = _inputs(shape, torch.float32, affine)
    with ops.use_backend(backend):
        y, grads = _run(layer_norm, x, w, b, dy, 1e-5)
    yd, gd = _run(F.layer_norm, *(None if t is None else t.double() for t in (x, w, b, dy)), 1e-5)
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, gd):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 16, 320), (2, 4, 1280), (1, 6, 1536), (3, 5, 7)])
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_bf16_within_twice_torch(backend, lowp_dtype, shape, affine):
    x, w, b, dy = _inputs(shape, lowp_dtype, affine, seed=2)
    with ops.use_backend(backend):
        y, grads = _run(layer_norm, x, w, b, dy, 1e-5)
    f32 = [None if t is None else t.float() for t in (x, w, b, dy)]
    y32, g32 = _run(F.layer_norm, *f32, 1e-5)
    yt, gt = _run(F.layer_norm, x, w, b, dy, 1e-5)  # torch's own layer norm in that dtype
    assert_close_lowp(y, y32, yt, f"{backend} forward", floor=1e-6)
    for name, got, ref, tor in zip(("dx", "dw", "db"), grads, g32, gt):
        assert_close_lowp(got, ref, tor, f"{backend} {name}", floor=1e-6)


def test_non_contiguous_and_channels_last_views(backend):
    x = torch.randn(2, 12, 9, 64)[:, ::3]  # non-contiguous
    w, b = torch.randn(64), torch.randn(64)
    with ops.use_backend(backend):
        got = layer_norm(x, 64, w, b, 1e-6)
    torch.testing.assert_close(got, F.layer_norm(x, (64,), w, b, 1e-6), rtol=1e-5, atol=1e-5)


def test_empty_constant_rows_and_nan(backend):
    with ops.use_backend(backend):
        assert layer_norm(torch.empty(0, 8), 8).shape == (0, 8)
        # A constant row has zero variance: output is bias (xhat = 0), finite, as F.layer_norm.
        const = layer_norm(torch.full((2, 16), 3.0), 16, torch.ones(16), torch.full((16,), 0.5))
        xn = torch.randn(2, 8)
        xn[0, 3] = float("nan")
        out = layer_norm(xn, 8)
    torch.testing.assert_close(const, torch.full((2, 16), 0.5))
    # Documented result: a NaN poisons its own row (its mean), never another row.
    assert out[0].isnan().all() and not out[1].isnan().any()


def test_multi_dim_normalized_shape_goes_to_reference_and_bad_input():
    x = torch.randn(2, 3, 4)
    assert OP.select(x, (3, 4)) == "ref"
    torch.testing.assert_close(layer_norm(x, (3, 4)), F.layer_norm(x, (3, 4)))
    with pytest.raises(ValueError, match="does not end in normalized_shape"):
        layer_norm(x, 5)
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(x, 4, torch.ones(5))
    with pytest.raises(TypeError, match="must be a tensor"):
        layer_norm(x.numpy(), 4)


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
def test_dispatch_reasons_and_opcheck():
    x = torch.randn(2, 8)
    assert OP.select(x, (8,), torch.ones(8, dtype=torch.bfloat16)) == "ref"  # mixed dtypes: reference
    assert OP.select(x.half(), (8,)) == "ref"
    # Forward-only ties with F.layer_norm, so automatic dispatch keeps the kernel for training.
    assert OP.select(x, (8,)) == "ref"
    assert OP.select(x.requires_grad_(), (8,)) == "cpu"
    with torch.no_grad():
        assert OP.select(x, (8,)) == "ref"
    x = x.detach()
    with ops.use_backend("cpu"):
        assert OP.select(x, (8,)) == "cpu"  # an explicit request still runs the kernel
    with ops.use_backend("cpu"):
        with pytest.raises(ops.BackendUnavailable, match="kernels need one dtype"):
            layer_norm(x, 8, torch.ones(8, dtype=torch.bfloat16))
    xs = torch.randn(3, 16, requires_grad=True)
    ws = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.layer_norm_fwd, (xs, ws, torch.randn(16, requires_grad=True), 1e-5))
    torch.library.opcheck(torch.ops.fastdiff.layer_norm_fwd, (xs, None, None, 1e-5))


def test_module_is_a_drop_in_for_nn_layernorm():
    torch.manual_seed(0)
    ref = nn.LayerNorm(320, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = LayerNorm(320, eps=1e-6)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 7, 320)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    for kw in (dict(elementwise_affine=False), dict(bias=False)):
        a, b = nn.LayerNorm(64, **kw), LayerNorm(64, **kw)
        assert a.state_dict().keys() == b.state_dict().keys()
        torch.testing.assert_close(b(x[..., :64]), a(x[..., :64]), rtol=1e-5, atol=1e-5)
    assert isinstance(mine, nn.LayerNorm)
