"""fastdiff.ops.attention on every backend available here (ref, cpu) against the explicit reference.

The triton backend runs on CPU tensors only under the interpreter: tests/test_triton_interpret.py.
"""
import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import attention, attention_ref
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

OP = all_ops()["attention"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here

# (B, H, Lq, Lk, D): SD1 head dims (40, 80, 160) and SD3's 64, self and cross (77 tokens), odd sizes, batch 1.
SHAPES = [(2, 2, 64, 64, 40), (1, 2, 96, 77, 40), (2, 1, 50, 50, 80), (1, 1, 33, 40, 160), (1, 3, 70, 70, 64),
          (1, 1, 1, 5, 8)]


def _qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def _fp64_oracle(q, k, v, mask=None, scale=None):
    """An independent oracle: SDPA's math in float64."""
    m = mask
    if m is not None and m.dtype != torch.bool:
        m = m.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, scale=scale)


def test_cpu_backend_is_chosen_for_cpu_tensors():
    q, k, v = _qkv(1, 1, 8, 8, 40)
    want = "cpu" if HAS_CPU else "ref"
    assert OP.select(q, k, v, None, None) == want
    assert OP.select(*_qkv(1, 1, 8, 8, 40, torch.float16), None, None) == "ref"   # fp16 is slow on this CPU


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_grads(backend, shape):
    q, k, v = (t.requires_grad_(True) for t in _qkv(*shape))
    with ops.use_backend(backend):
        out = attention(q, k, v)
    ref = _fp64_oracle(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    gr = torch.autograd.grad(ref, (q, k, v), do.double())
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 2, 64, 64, 40), (1, 2, 96, 77, 80), (1, 1, 40, 40, 160),
                                   (1, 2, 1200, 1100, 64)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_within_2x_torch(backend, shape):
    # The last shape crosses the cpu backend's fp32-upcast threshold (Lq * Lk >= 1.2e6).
    q, k, v = _qkv(*shape, torch.bfloat16)
    ref = attention_ref(q.float(), k.float(), v.float())
    with ops.use_backend(backend):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    eager_bf16 = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * shape[-1] ** -0.5, -1), v)
    assert_close_lowp(out, ref, eager_bf16, f"attention {backend} bf16 {shape}")


def test_bf16_grads_within_2x_torch(backend):
    q, k, v = _qkv(1, 2, 64, 77, 40, torch.bfloat16)
    leaves32 = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = attention_ref(*leaves32)
    do = torch.randn(ref.shape).bfloat16()
    gref = torch.autograd.grad(ref, leaves32, do.float())
    lt = [t.clone().requires_grad_(True) for t in (q, k, v)]
    tg = torch.autograd.grad(F.scaled_dot_product_attention(*lt), lt, do)
    lb = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with ops.use_backend(backend):
        out = attention(*lb)
    for name, a, b, t in zip("qkv", torch.autograd.grad(out, lb, do), gref, tg):
        assert_close_lowp(a, b, t, f"d{name} {backend}")


def test_masks_scale_noncontiguous(backend):
    B, H, Lq, Lk, D = 2, 2, 30, 77, 40
    g = torch.Generator().manual_seed(1)
    # diffusers' layout viewed through a transpose: non-contiguous q, k, v
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for L in (Lq, Lk, Lk))
    pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    pad[1, ..., 40:] = False
    bias = torch.randn(Lq, Lk, generator=g)
    full = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
    full[:, :, 3] = False   # fully masked query rows: documented output 0
    for mask in (None, pad, bias, full):
        with ops.use_backend(backend):
            out = attention(q, k, v, mask, scale=0.2)
        ref = attention_ref(q, k, v, mask, scale=0.2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if mask is full:
            assert torch.all(out[:, :, 3] == 0)
        else:
            torch.testing.assert_close(out.double(), _fp64_oracle(q, k, v, mask, 0.2), rtol=1e-5, atol=1e-5)


def test_edge_cases_and_bad_input():
    q, k, v = _qkv(1, 2, 5, 7, 40)
    # no keys: zeros (documented); empty batch: empty
    assert torch.equal(attention(q, k[:, :, :0], v[:, :, :0]), torch.zeros_like(q))
    assert attention(q[:0], k[:0], v[:0]).shape == (0, 2, 5, 40)
    # NaN in one query row stays in that row
    qn = q.clone()
    qn[0, 0, 2, 0] = float("nan")
    out = attention(qn, k, v)
    assert torch.isnan(out[0, 0, 2]).all() and not torch.isnan(out[0, 0, :2]).any() and not torch.isnan(out[0, 1]).any()
    with pytest.raises(ValueError, match="4-d"):
        attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q, k.bfloat16(), v)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="expected q"):
        attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, torch.zeros(3, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool .* or floating"):
        attention(q, k, v, torch.zeros(5, 7, dtype=torch.int32))
    with pytest.raises(ops.BackendUnavailable, match="triton"):
        with ops.use_backend("triton"):
            attention(q, k, v)
