"""adaLN ops (modulate, layer_norm_modulate, gate_residual) on every available backend: references, diffusers'
AdaLayerNormZero, gradients, bad input."""
import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import (gate_residual, gate_residual_ref, layer_norm_modulate, layer_norm_modulate_ref, modulate,
                          modulate_ref)
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

OP = all_ops()["modulate"]  # gate_residual lives beside it, on the same backends
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# SD3 MMDiT hidden 1536 (image + text tokens), DiT-like 1152, odd sizes; x (B, L, D), vectors (B, D).
SHAPES = [(2, 16, 1536), (1, 9, 1152), (3, 5, 7), (2, 1, 1), (2, 3, 4, 8)]
OPS = {
    "modulate": (modulate, modulate_ref, 2),
    "layer_norm_modulate": (layer_norm_modulate, layer_norm_modulate_ref, 2),
    "gate_residual": (gate_residual, gate_residual_ref, None),
}


def _inputs(name, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    vec = lambda: (torch.randn(shape[0], shape[-1], generator=g) * 0.5).to(dtype)  # noqa: E731
    if name == "gate_residual":
        args = (x, vec(), torch.randn(shape, generator=g).to(dtype))
    else:
        args = (x, vec(), vec())
    return args, torch.randn(shape, generator=g).to(dtype)


def _run(fn, args, dy):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_backward(backend, name, shape):
    fn, ref, _ = OPS[name]
    args, dy = _inputs(name, shape, torch.float32)
    with ops.use_backend(backend):
        y, grads = _run(fn, args, dy)
    yd, gd = _run(ref, [a.double() for a in args], dy.double())
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, gd):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", [(2, 16, 1536), (3, 5, 7)])
def test_bf16_within_twice_torch(backend, lowp_dtype, name, shape):
    fn, ref, _ = OPS[name]
    args, dy = _inputs(name, shape, lowp_dtype, seed=4)
    with ops.use_backend(backend):
        y, grads = _run(fn, args, dy)
    y32, g32 = _run(ref, [a.float() for a in args], dy.float())
    yt, gt = _run(ref, args, dy)  # the eager sequence in that dtype
    assert_close_lowp(y, y32, yt, f"{backend} {name} forward", floor=1e-6)
    for i, (got, r, t) in enumerate(zip(grads, g32, gt)):
        assert_close_lowp(got, r, t, f"{backend} {name} grad {i}", floor=1e-6)


def test_matches_diffusers_ada_layer_norm_zero(backend):
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(0)
    m = AdaLayerNormZero(64)
    x, emb = torch.randn(2, 10, 64), torch.randn(2, 64)
    want, gate_msa, shift_mlp, scale_mlp, gate_mlp = m(x, emb=emb)
    shift_msa, scale_msa = m.linear(m.silu(emb)).chunk(6, dim=1)[:2]
    with ops.use_backend(backend):
        got = layer_norm_modulate(x, shift_msa, scale_msa, eps=1e-6)
        res = gate_residual(x, gate_msa, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, x + gate_msa.unsqueeze(1) * want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer_norm_modulate_ref(x, shift_msa, scale_msa),
                               F.layer_norm(x, (64,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None])


def test_non_contiguous_and_empty(backend):
    x = torch.randn(2, 20, 48)[:, ::2]
    shift, scale = torch.randn(4, 48)[::2], torch.randn(2, 96)[:, ::2]
    y = torch.randn(2, 10, 48).transpose(0, 1).contiguous().transpose(0, 1)
    with ops.use_backend(backend):
        torch.testing.assert_close(modulate(x, shift, scale), modulate_ref(x, shift, scale), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer_norm_modulate(x, shift, scale), layer_norm_modulate_ref(x, shift, scale),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gate_residual(x, scale, y), gate_residual_ref(x, scale, y), rtol=1e-5, atol=1e-5)
        e = torch.empty(2, 0, 8)
        v = torch.randn(2, 8)
        assert modulate(e, v, v).shape == e.shape and layer_norm_modulate(e, v, v).shape == e.shape
        assert gate_residual(e, v, e).shape == e.shape
        # Gradients of the per-batch vectors over zero tokens are zeros.
        vv = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(layer_norm_modulate(e, vv, v).sum(), vv)
    assert (g == 0).all()


def test_bad_inputs():
    x, v = torch.randn(2, 5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"must be \(B, D\)"):
        modulate(x, torch.randn(8), v)
    with pytest.raises(ValueError, match=r"must be \(B, D\)"):
        layer_norm_modulate(x, v, torch.randn(1, 8))
    with pytest.raises(ValueError, match="shape of x"):
        gate_residual(x, v, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"\(B, \.\.\., D\)"):
        modulate(torch.randn(8), torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(TypeError, match="tensors"):
        modulate(x, v, 1.0)


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
def test_mixed_dtypes_use_reference_and_opcheck():
    x, v = torch.randn(2, 5, 8).bfloat16(), torch.randn(2, 8)
    assert all_ops()["modulate"].select(x, v, v) == "ref"
    assert modulate(x, v, v).dtype == torch.float32  # eager type promotion, kept by the reference
    with ops.use_backend("cpu"):
        with pytest.raises(ops.BackendUnavailable, match="mix dtypes"):
            modulate(x, v, v)
    xs, vs = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.modulate, (xs, vs, torch.randn(2, 8, requires_grad=True)))
    torch.library.opcheck(torch.ops.fastdiff.layer_norm_modulate, (xs, vs, torch.randn(2, 8, requires_grad=True), 1e-6))
    torch.library.opcheck(torch.ops.fastdiff.gate_residual, (xs, vs, torch.randn(2, 5, 8, requires_grad=True)))
