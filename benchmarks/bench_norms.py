"""LayerNorm and RMSNorm (last dim) vs the eager PyTorch they replace: forward and training step.

LayerNorm's baseline is ``F.layer_norm`` (already one ATen kernel: the forward ties, so automatic dispatch uses the
kernel only for training, where forward + backward wins); RMSNorm's is diffusers' sequence
(``x.float().pow(2).mean``, ``rsqrt``, multiplies and casts), SD3's q/k norm at head dim 64.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import layer_norm, rms_norm, rms_norm_ref, use_backend
from fastdiff.ops.registry import all_ops

from conftest import nbytes

LN_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 4096, 1536)]
RMS_SHAPES = [(2, 24, 4096, 64), (2, 24, 1024, 64)]  # SD3 q/k at 1024px and 512px, 24 heads
DTYPES = [torch.float32, torch.bfloat16]


def _case(shape, dtype):
    return f"{tuple(shape)} {str(dtype)[6:]}"


def _params(d, dtype):
    return torch.randn(d).to(dtype), torch.randn(d).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_forward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype)
    w, b = _params(shape[-1], dtype)
    d = (shape[-1],)
    auto = all_ops()["layer_norm"].select(x, d, w, b)

    # Times the compiled kernel itself (forced): automatic dispatch sends forward-only calls to F.layer_norm
    # because this comparison is a tie (see fastdiff/ops/layer_norm.py).
    def fast():
        with use_backend("cpu"):
            return layer_norm(x, d, w, b)

    compare(f"layer_norm fwd [cpu forced; auto={auto}]", _case(shape, dtype), fast, lambda: F.layer_norm(x, d, w, b),
            nbytes(x, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", LN_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_forward_backward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    w, b = (p.requires_grad_() for p in _params(shape[-1], dtype))
    dy = torch.randn(shape).to(dtype)
    d = (shape[-1],)
    backend = all_ops()["layer_norm"].select(x, d, w, b)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, d, w, b), (x, w, b), dy)

    compare(f"layer_norm fwd+bwd [{backend}]", _case(shape, dtype), step(layer_norm), step(F.layer_norm),
            nbytes(x, x) + nbytes(x, dy, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_forward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    d = (shape[-1],)
    backend = all_ops()["rms_norm"].select(x, d, w, 1e-6)
    compare(f"rms_norm fwd [{backend}]", _case(shape, dtype), lambda: rms_norm(x, d, w, 1e-6),
            lambda: rms_norm_ref(x, d, w, 1e-6), nbytes(x, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", RMS_SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_forward_backward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    w = torch.randn(shape[-1]).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    d = (shape[-1],)
    backend = all_ops()["rms_norm"].select(x, d, w, 1e-6)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, d, w, 1e-6), (x, w), dy)

    compare(f"rms_norm fwd+bwd [{backend}]", _case(shape, dtype), step(rms_norm), step(rms_norm_ref),
            nbytes(x, x) + nbytes(x, dy, x))
