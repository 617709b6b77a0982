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
def test_bf16_within_2x_torch(backend, lowp_dtype, shape):
    # The last shape crosses the cpu backend's fp32-upcast threshold (Lq * Lk >= 1.2e6).
    q, k, v = _qkv(*shape, lowp_dtype)
    ref = attention_ref(q.float(), k.float(), v.float())
    with ops.use_backend(backend):
        out = attention(q, k, v)
    assert out.dtype == lowp_dtype
    eager_bf16 = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * shape[-1] ** -0.5, -1), v)
    assert_close_lowp(out, ref, eager_bf16, f"attention {backend} {lowp_dtype} {shape}")


# The second shape has enough keys that a routing row with train_sdpa_bf16_min_keys runs torch SDPA for it in bf16.
@pytest.mark.parametrize("shape", [(1, 2, 64, 77, 40), (1, 2, 96, 300, 80)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_grads_within_2x_torch(backend, lowp_dtype, shape):
    q, k, v = _qkv(*shape, lowp_dtype)
    leaves32 = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = attention_ref(*leaves32)
    do = torch.randn(ref.shape).to(lowp_dtype)
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


# ------------------------------------------------------------------------------------------------------------------
# fastdiff's CPU flash-attention kernel itself (the ``cpu`` backend runs it where it beats torch SDPA)
# ------------------------------------------------------------------------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from fastdiff import _ext  # noqa: E402
from fastdiff.ops.attention import cpu_flash_attention  # noqa: E402

needs_kernel = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="compiled CPU kernels not built")

# Every head dim SD uses, odd lengths (vector and key-block tails: blocks are 64-192 keys), lengths across several
# key blocks and query tiles, batch 1, the SD1 cross-attention (77 keys), an SD3-like joint length.
KERNEL_SHAPES = [(1, 1, 1, 1, 8), (2, 3, 7, 5, 40), (1, 2, 130, 77, 40), (2, 1, 97, 200, 64), (1, 2, 50, 129, 80),
                 (1, 1, 49, 300, 160), (1, 2, 33, 47, 24), (2, 2, 257, 257, 64)]


def _masks(B, H, Lq, Lk, seed=3):
    g = torch.Generator().manual_seed(seed)
    pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    pad[-1, ..., Lk // 2 + 1:] = False
    full = torch.rand(B, H, Lq, Lk, generator=g) > 0.4
    full[:, :, 0] = False                      # fully masked rows: output 0, gradients 0
    return {"none": None, "pad": pad, "bias": torch.randn(Lq, Lk, generator=g), "full": full,
            "neg-inf-bias": torch.randn(1, H, Lq, Lk, generator=g).masked_fill(~full[:1], float("-inf"))}


@needs_kernel
@pytest.mark.parametrize("mask_kind", ["none", "pad", "bias", "full", "neg-inf-bias"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_fp32_forward_backward_vs_fp64(shape, mask_kind):
    """fp32 kernel against the fp64 reference (its autograd gives the gradient oracle)."""
    B, H, Lq, Lk, D = shape
    mask = _masks(B, H, Lq, Lk)[mask_kind]
    if mask is not None and mask.dim() == 4 and mask.shape[1] not in (1, H):
        mask = mask[:, :1]
    g = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).requires_grad_() for L in (Lq, Lk, Lk))
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = attention_ref(q64, k64, v64, m64, 0.3)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref = torch.autograd.grad(ref, (q64, k64, v64), do)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out = cpu_flash_attention(q, k, v, mask, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), do.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    for name, a, b in zip("qkv", grads, gref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    if mask_kind == "full":
        assert torch.all(out[:, :, 0] == 0) and torch.all(grads[0][:, :, 0] == 0)


@needs_kernel
def test_kernel_noncontiguous_inputs_and_views():
    """diffusers' (B, L, H, D) layout seen through transpose(1, 2), a strided slice along D, an expanded k/v."""
    B, H, Lq, Lk, D = 2, 3, 70, 77, 40
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_() for L in (Lq, Lk, Lk))
    wide = torch.randn(B, H, Lq, 2 * D, generator=g)[..., ::2]             # stride 2 along D: the kernel copies
    kb = torch.randn(1, 1, Lk, D, generator=g).expand(B, H, Lk, D)          # stride 0 in B and H
    for qq, kk, vv in ((q, k, v), (wide, k.detach(), v.detach()), (q.detach(), kb, kb)):
        out = cpu_flash_attention(qq, kk, vv)
        ref = _fp64_oracle(qq, kk, vv)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    do = torch.randn(B, H, Lq, D, generator=g)
    grads = torch.autograd.grad(cpu_flash_attention(q, k, v), (q, k, v), do)
    gref = torch.autograd.grad(attention_ref(q, k, v), (q, k, v), do)
    for a, b in zip(grads, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("pair_dot", [1, 2], ids=["fp32-products", "bf16-pair-products"])
@pytest.mark.parametrize("shape", [(2, 2, 64, 64, 40), (1, 2, 96, 77, 80), (1, 1, 40, 131, 160), (1, 2, 300, 330, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernel_bf16_within_2x_torch(shape, pair_dot):
    """bf16 forward under the low-precision rule, with fp32 products (AVX2/AVX-512) and with the bf16 pair products
    of the AVX512-BF16 path (vdpbf16ps there, its emulation on other CPUs: the same packing and loops)."""
    q, k, v = _qkv(*shape, torch.bfloat16)
    ref = attention_ref(q.float(), k.float(), v.float())
    eager_bf16 = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * shape[-1] ** -0.5, -1), v)
    out = cpu_flash_attention(q, k, v, pair_dot=pair_dot)
    assert out.dtype == torch.bfloat16
    assert_close_lowp(out, ref, eager_bf16, f"kernel bf16 pair_dot={pair_dot} {shape}")
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert_close_lowp(out, ref, sdpa, f"kernel bf16 vs torch SDPA's error, pair_dot={pair_dot} {shape}")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 2, 64, 77, 40), (2, 1, 130, 130, 64)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_bf16_grads_within_2x_torch(shape):
    q, k, v = _qkv(*shape, torch.bfloat16)
    leaves32 = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = attention_ref(*leaves32)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    gref = torch.autograd.grad(ref, leaves32, do.float())
    lt = [t.clone().requires_grad_(True) for t in (q, k, v)]
    tg = torch.autograd.grad(F.scaled_dot_product_attention(*lt), lt, do)
    lb = [t.clone().requires_grad_(True) for t in (q, k, v)]
    for name, a, b, t in zip("qkv", torch.autograd.grad(cpu_flash_attention(*lb), lb, do), gref, tg):
        assert a.dtype == torch.bfloat16
        assert_close_lowp(a, b, t, f"kernel bf16 d{name} {shape}")


@needs_kernel
def test_kernel_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree (torch.compile relies on them)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 9, 11, 40))
    mask = torch.randn(1, 1, 9, 11)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, mask, 0.2, 0))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, None, 0.2, 1))


@needs_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16"])
def test_kernel_each_isa_variant(isa):
    """Every compiled ISA variant (FASTDIFF_CPU_ISA, in a child process) against the fp64 reference, fp32 and bf16,
    forward and backward, with a mask and odd lengths (the scalar variant runs the same code at W = 1)."""
    code = r"""
import torch
from fastdiff import _ext
from fastdiff.ops.attention import attention_ref, cpu_flash_attention
assert _ext.cpu_capability() == ISA, _ext.cpu_capability()
g = torch.Generator().manual_seed(0)
for B, H, Lq, Lk, D in ((1, 2, 37, 77, 40), (2, 1, 70, 200, 64), (1, 1, 19, 23, 160)):
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).requires_grad_() for L in (Lq, Lk, Lk))
    mask = torch.randn(Lq, Lk, generator=g, dtype=torch.float64)
    ref = attention_ref(q, k, v, mask)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref = torch.autograd.grad(ref, (q, k, v), do)
    for dtype, tol, pair in ((torch.float32, 2e-5, 1), (torch.bfloat16, 3e-2, 1), (torch.bfloat16, 3e-2, 2)):
        ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = cpu_flash_attention(ql, kl, vl, mask.float(), pair_dot=pair)
        grads = torch.autograd.grad(out, (ql, kl, vl), do.to(dtype))
        for a, b in zip((out,) + grads, (ref,) + gref):
            e = ((a.double() - b).abs().max() / b.abs().max()).item()
            assert e < tol, (B, H, Lq, Lk, D, dtype, pair, e)
print("ok")
""".replace("ISA", repr(isa))
    env = dict(os.environ, FASTDIFF_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0 and "supports at most" in proc.stderr:
        pytest.skip(f"this CPU does not support {isa}")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
