"""Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the pure-PyTorch references.

Not collected by the normal run (the name does not start with ``test_``): ``tests/test_triton_interpret.py``
runs this file in a subprocess with TRITON_INTERPRET=1 set before triton is imported, so the rest of the suite
keeps the compiled-triton behaviour. Run it alone with::

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpret_cases.py -q

The interpreter is slow, so the shapes are small but cover what the kernels mask: odd lengths (77, 100),
cross-attention (Lq != Lk), every head dim (40, 64, 80, 160: padded to 64/128/256), several blocks per axis.
Under the interpreter the kernels upcast 16-bit tiles to fp32 before tl.dot (the interpreter's 16-bit dot
multiplies the raw 16-bit patterns), so bf16 here checks the kernels' loads, stores and rounding of inputs/outputs, and the
16-bit dots themselves are checked by the AOT compile (tests/test_triton_aot.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by test_triton_interpret.py
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/test_triton_interpret.py does)")

import fastdiff.ops as ops  # noqa: E402
from fastdiff.ops.attention import attention, attention_ref  # noqa: E402

from lowp import assert_close_lowp, max_err  # noqa: E402

# (B, H, Lq, Lk, D)
ATTN_SHAPES = [
    (1, 2, 64, 64, 40),      # SD1 head dim 40 (BLOCK_D 64)
    (2, 1, 77, 77, 64),      # SD3 head dim, odd length
    (1, 2, 100, 77, 80),     # cross-attention, SD1 head dim 80 (BLOCK_D 128)
    (1, 1, 160, 96, 160),    # SD1 head dim 160 (BLOCK_D 256), several query blocks
    (1, 1, 33, 130, 16),     # tiny head dim, several key blocks with a ragged tail
]


def _qkv(B, H, Lq, Lk, D, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        # diffusers' layout: (B, L, H, D) viewed as (B, H, L, D) through a transpose.
        mk = lambda L: torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda L: torch.randn(B, H, L, D, generator=g).to(dtype)  # noqa: E731
    return mk(Lq), mk(Lk), mk(Lk)


def _triton(q, k, v, mask=None, scale=None):
    with ops.use_backend("triton"):
        return attention(q, k, v, mask, scale)


@pytest.mark.parametrize("shape", [s for s in ATTN_SHAPES if s[-1] <= 128], ids=lambda s: "x".join(map(str, s)))
def test_attention_fwd_bwd_fp32(shape):
    q, k, v = _qkv(*shape, torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = _triton(q, k, v)
    ref = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    gr = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip("qkv", g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("shape", ATTN_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_attention_bf16_within_2x_torch(shape):
    q, k, v = _qkv(*shape, torch.bfloat16)
    q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, k, v))
    ref = attention_ref(q32, k32, v32)
    do = torch.randn(ref.shape).bfloat16()
    gref = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    # Torch's own bf16 attention (SDPA's CPU kernel) is the error budget.
    qt, kt, vt = (t.clone().requires_grad_(True) for t in (q, k, v))
    tout = F.scaled_dot_product_attention(qt, kt, vt)
    tg = torch.autograd.grad(tout, (qt, kt, vt), do)
    qk, kk, vk = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = _triton(qk, kk, vk)
    assert out.dtype == torch.bfloat16
    g = torch.autograd.grad(out, (qk, kk, vk), do)
    assert_close_lowp(out, ref, tout, "attention bf16 out")
    for name, a, b, t in zip("qkv", g, gref, tg):
        assert_close_lowp(a, b, t, f"attention bf16 d{name}")


def test_attention_fp32_head_dim_160_is_declined_with_reason():
    q, k, v = _qkv(1, 1, 16, 16, 160, torch.float32)
    with pytest.raises(ops.BackendUnavailable, match="head_dim 160 > 128 in fp32"):
        _triton(q, k, v)


def test_attention_noncontiguous_and_scale():
    q, k, v = _qkv(2, 3, 70, 50, 40, torch.float32, noncontig=True)
    assert not q.is_contiguous()
    torch.testing.assert_close(_triton(q, k, v, scale=0.3), attention_ref(q, k, v, scale=0.3), rtol=1e-4, atol=1e-5)


def test_attention_masks():
    B, H, Lq, Lk, D = 2, 2, 70, 77, 40
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    # Key padding (bool, broadcast over heads and queries): batch 1 sees only its first 50 keys.
    pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    pad[1, ..., 50:] = False
    # Additive float mask over (Lq, Lk), broadcast over batch and heads.
    bias = torch.randn(Lq, Lk, generator=g)
    # A bool mask with fully masked query rows: documented output 0 and zero gradient.
    full = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
    full[:, :, 5] = False
    for mask in (pad, bias, full):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = _triton(qg, kg, vg, mask)
        ref = attention_ref(qr, kr, vr, mask)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        do = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (qg, kg, vg), do), torch.autograd.grad(ref, (qr, kr, vr), do)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out = _triton(q, k, v, full)
    assert torch.all(out[:, :, 5] == 0)
    # The reference agrees with torch's SDPA on the fully masked rows (0), so the convention is torch's.
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=full), attention_ref(q, k, v, full),
                               rtol=1e-4, atol=1e-5)


def test_attention_nan_propagates_to_its_rows_only():
    q, k, v = _qkv(1, 1, 40, 40, 40, torch.float32)
    q[0, 0, 3, 7] = float("nan")
    out = _triton(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all()
    rest = torch.cat([out[0, 0, :3], out[0, 0, 4:]])
    assert max_err(rest, torch.cat([attention_ref(q, k, v)[0, 0, :3], attention_ref(q, k, v)[0, 0, 4:]])) < 1e-5


def test_interpreter_is_never_chosen_automatically():
    q, k, v = _qkv(1, 1, 16, 16, 16, torch.float32)
    assert ops.all_ops()["attention"].select(q, k, v, None, None) != "triton"


# ----------------------------------------------------------------------------------------------------------
# sampler_step
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cfg,noise,clip", [(True, True, 1.0), (False, False, None), (True, False, None),
                                            (False, True, 0.5)])
def test_sampler_step_matches_reference(dtype, cfg, noise, clip):
    from fastdiff.ops import sampler_step, sampler_step_ref

    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 17, 13)   # odd sizes: the last block is partial
    x = torch.randn(shape, generator=g).to(dtype)
    m = torch.randn(((2 if cfg else 1) * shape[0],) + shape[1:], generator=g).to(dtype)
    z = torch.randn(shape, generator=g).to(dtype) if noise else None
    kw = dict(pred=(1.25, -0.6), clip=clip, guidance_scale=7.5 if cfg else None)
    with ops.use_backend("triton"):
        got = sampler_step(x, m, 0.8, 0.15, 0.05, z, **kw)
    ref = sampler_step_ref(x, m, 0.8, 0.15, 0.05, z, **kw)   # fp32 math, one rounding at the end
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:   # same math in fp32 and one round-to-nearest: at most one unit in the last place apart
        ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.float() - ref.float()).abs() <= ulp).all()


def test_sampler_step_large_strided():
    from fastdiff.ops import sampler_step, sampler_step_ref

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 40, 40, generator=g).transpose(2, 3)   # non-contiguous
    m = torch.randn(2, 16, 40, 40, generator=g)
    with ops.use_backend("triton"):
        got = sampler_step(x, m, 0.7, 0.2, guidance_scale=3.0)
    torch.testing.assert_close(got, sampler_step_ref(x, m, 0.7, 0.2, guidance_scale=3.0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# group_norm (+ residual) (+ SiLU): forward and backward kernels against F.group_norm in fp32
# ----------------------------------------------------------------------------------------------------------

def _gn_oracle(x, G, w, b, eps, silu, r, rc):
    v = x.float()
    if r is not None:
        v = v + r.float()
    if rc is not None:
        v = v + rc.float()[(...,) + (None,) * (x.dim() - 2)]
    z = F.group_norm(v, G, w, b, eps)
    return F.silu(z) if silu else z


_GN_CASES = [
    # shape, groups, layout, silu, residual, channel residual
    ((2, 40, 9, 7), 4, "nchw", False, False, False),            # cpg 10, odd spatial size
    ((2, 40, 9, 7), 4, "channels_last", True, False, False),
    ((2, 40, 9, 7), 4, "channels_last", True, True, True),
    ((1, 32, 16, 16), 16, "nchw", True, True, True),             # cpg 2
    ((2, 24, 5), 3, "nchw", True, False, True),                  # 1-d positions, cpg 8
    ((1, 96, 4, 4), 2, "channels_last", False, True, False),     # cpg 48 (BLOCK_C 64)
]


@pytest.mark.parametrize("shape,G,layout,silu,res,cres", _GN_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-G{c[1]}-{c[2]}-silu{int(c[3])}-res{int(c[4])}-cres{int(c[5])}"
                              for c in _GN_CASES])
def test_group_norm_fwd_bwd_fp32(shape, G, layout, silu, res, cres):
    from fastdiff.kernels.group_norm import group_norm_bwd, group_norm_fwd

    g = torch.Generator().manual_seed(5)
    x = (3.0 + 2.0 * torch.randn(shape, generator=g))   # |mean| > std: the shifted sums matter
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = 1 + 0.3 * torch.randn(C, generator=g)
    b = 0.2 * torch.randn(C, generator=g)
    r = torch.randn(shape, generator=g) if res else None
    rc = torch.randn(shape[0], C, generator=g) if cres else None
    y, mean, rstd = group_norm_fwd(x, G, w, b, 1e-5, silu, r, rc)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b, r, rc)]
    ref = _gn_oracle(leaves[0], G, leaves[1], leaves[2], 1e-5, silu, leaves[3], leaves[4])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g)
    dx, dw, db, drc = group_norm_bwd(dy, x, G, w, b, mean, rstd, silu, r, rc)
    want = [t for t in leaves if t is not None]
    grads = dict(zip([i for i, t in enumerate(leaves) if t is not None], torch.autograd.grad(ref, want, dy)))
    torch.testing.assert_close(dx, grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, grads[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, grads[2], rtol=1e-4, atol=1e-4)
    if res:
        torch.testing.assert_close(dx, grads[3], rtol=1e-4, atol=1e-4)
    if cres:
        torch.testing.assert_close(drc, grads[4], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_group_norm_lowp_within_2x_torch(dtype):
    from fastdiff.kernels.group_norm import group_norm_fwd

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, 12, 12, generator=g).to(dtype)
    w = 1 + 0.3 * torch.randn(64, generator=g)
    b = 0.2 * torch.randn(64, generator=g)
    y, _, _ = group_norm_fwd(x, 8, w, b, 1e-5, True)
    ref = _gn_oracle(x.float(), 8, w, b, 1e-5, True, None, None)
    torch_lowp = F.silu(F.group_norm(x, 8, w.to(dtype), b.to(dtype), 1e-5))
    assert_close_lowp(y, ref, torch_lowp, f"group_norm+silu {dtype}")


def test_group_norm_public_op_on_triton_backend():
    """fastdiff.ops.group_norm with the triton backend forced: forward and autograd vs group_norm_ref, with the
    ResBlock's per-(sample, channel) residual (B, C, 1, 1) and a full residual, channels_last input."""
    from fastdiff.ops import group_norm, group_norm_ref

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 6, 5, generator=g).to(memory_format=torch.channels_last)
    w = 1 + 0.3 * torch.randn(40, generator=g)
    b = 0.2 * torch.randn(40, generator=g)
    for residual in (torch.randn(2, 40, 1, 1, generator=g), torch.randn(2, 40, 6, 5, generator=g)):
        a = [t.clone().requires_grad_(True) for t in (x, w, b, residual)]
        r = [t.clone().requires_grad_(True) for t in (x, w, b, residual)]
        with ops.use_backend("triton"):
            y = group_norm(a[0], 4, a[1], a[2], 1e-5, silu=True, residual=a[3])
        ref = group_norm_ref(r[0], 4, r[1], r[2], 1e-5, silu=True, residual=r[3])
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5)
        dy = torch.randn(y.shape, generator=g)
        for ga, gr in zip(torch.autograd.grad(y, a, dy), torch.autograd.grad(ref, r, dy)):
            assert ga.shape == gr.shape
            torch.testing.assert_close(ga, gr, rtol=1e-4, atol=2e-4)


def test_group_norm_split_reductions_fwd_bwd():
    """Shapes whose reductions are split over several chunks of positions (merged by the second kernels):
    forward and backward against F.group_norm, NCHW and channels_last, residual and per-channel residual."""
    from fastdiff.kernels import group_norm as gn

    for shape, G in (((1, 8, 40, 40), 2), ((2, 6, 40, 61), 3)):
        C, n = shape[1], shape[2] * shape[3]
        block_c, block_n = gn._blocks(C // G)
        assert gn._splits(shape[0] * G, n, block_n, gn.sm_count(torch.device("cpu")))[0] > 1
        block_n_bwd = gn._blocks(C // G, gn._TILE_BWD)[1]
        assert gn._splits(shape[0] * G, n, block_n_bwd, gn.sm_count(torch.device("cpu")))[0] > 1
        for layout in ("nchw", "channels_last"):
            g = torch.Generator().manual_seed(11)
            x = 2.0 + torch.randn(shape, generator=g)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            w = 1 + 0.3 * torch.randn(C, generator=g)
            b = 0.2 * torch.randn(C, generator=g)
            r = torch.randn(shape, generator=g)
            rc = torch.randn(shape[0], C, generator=g)
            y, mean, rstd = gn.group_norm_fwd(x, G, w, b, 1e-5, True, r, rc)
            leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r, rc)]
            ref = _gn_oracle(leaves[0], G, leaves[1], leaves[2], 1e-5, True, leaves[3], leaves[4])
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5)
            dy = torch.randn(shape, generator=g)
            dx, dw, db, drc = gn.group_norm_bwd(dy, x, G, w, b, mean, rstd, True, r, rc)
            gx, gw, gb, gr, grc = torch.autograd.grad(ref, leaves, dy)
            for name, got, want in (("dx", dx, gx), ("dw", dw, gw), ("db", db, gb), ("dr", dx, gr), ("drc", drc, grc)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4, msg=lambda m: f"{layout} {name}: {m}")


def test_group_norm_input_with_gaps():
    """A batch slice (strides with gaps): y and dx are written in a dense layout, never with x's gapped strides
    (which would write past the end of y)."""
    from fastdiff.kernels.group_norm import group_norm_bwd, group_norm_fwd

    g = torch.Generator().manual_seed(12)
    big = torch.randn(6, 16, 5, 7, generator=g)
    x = big[::2]
    assert not x.is_contiguous()
    w = 1 + 0.3 * torch.randn(16, generator=g)
    b = 0.2 * torch.randn(16, generator=g)
    y, mean, rstd = group_norm_fwd(x, 4, w, b, 1e-5, True)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = _gn_oracle(leaves[0], 4, leaves[1], leaves[2], 1e-5, True, None, None)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5)
    dy = torch.randn(big.shape, generator=g)[1::2]
    dx, dw, db, _ = group_norm_bwd(dy, x, 4, w, b, mean, rstd, True)
    for got, want in zip((dx, dw, db), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------------------
# int64 offsets. A tensor past 2^31 elements would need gigabytes of real memory under the interpreter, so
# these views have the strides of one: a few elements per batch entry, batch stride 2^30 (an int32 argument),
# batch 3, so b * stride_b = 2^31 wraps in int32. They lie in one storage of 2^32+ elements that is allocated
# but never touched except where the views are (virtual memory only). The views start 2^31 elements in, so a
# wrapped offset lands at the start of the storage, which is filled with other values: int32 offsets give
# wrong results instead of a crash.
# ----------------------------------------------------------------------------------------------------------

_WRAP = 2 ** 31
_BSTRIDE = 2 ** 30


def _huge_storage(dtype, fill):
    st = torch.empty(2 ** 32 + 2 ** 20, dtype=dtype)
    st[: 2 ** 20].fill_(fill)          # where int32-wrapped offsets land
    return st


def _batch_view(st, offset, shape, values=None):
    """(3, *shape) view of ``st`` at ``_WRAP + offset`` with batch stride 2^30 and dense inner dims."""
    inner = torch.empty(shape).stride()
    v = st.as_strided((3, *shape), (_BSTRIDE, *inner), _WRAP + offset)
    if values is not None:
        v.copy_(values)
    return v


def test_group_norm_int64_offsets():
    from fastdiff.kernels import group_norm as gn

    shape, G = (4, 2, 3), 2       # per batch entry: C = 4 channels of 2 x 3 positions
    g = torch.Generator().manual_seed(13)
    st = _huge_storage(torch.float16, 9.0)
    x = _batch_view(st, 0, shape, 1.5 + torch.randn((3, *shape), generator=g))
    r = _batch_view(st, 4096, shape, torch.randn((3, *shape), generator=g))
    y = _batch_view(st, 8192, shape)
    dy = _batch_view(st, 12288, shape, torch.randn((3, *shape), generator=g))
    dx = _batch_view(st, 16384, shape)
    w = 1 + 0.3 * torch.randn(4, generator=g)
    b = 0.2 * torch.randn(4, generator=g)
    rc = torch.randn(3, 4, generator=g)
    _, strides = gn._view3(x)
    assert strides == (_BSTRIDE, 6, 1)
    mean = torch.empty(3, G)
    rstd = torch.empty(3, G)
    gn._launch_fwd(x, strides, r, w, b, rc, y, mean, rstd, G, 6, 1e-5, True)
    leaves = [t.float().clone().requires_grad_(True) for t in (x, w, b, r, rc)]
    ref = _gn_oracle(leaves[0], G, leaves[1], leaves[2], 1e-5, True, leaves[3], leaves[4])
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)   # fp16 output rounding
    dwp, dbp, drc = torch.empty(3, 4), torch.empty(3, 4), torch.empty(3, 4)
    gn._launch_bwd(dy, x, strides, r, w, b, rc, mean, rstd, dx, dwp, dbp, drc, G, 6, True)
    gx, gw, gb, _, grc = torch.autograd.grad(ref, leaves, dy.float())
    torch.testing.assert_close(dx.float(), gx, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dwp.sum(0), gw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbp.sum(0), gb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(drc, grc, rtol=1e-4, atol=1e-4)


def test_attention_int64_offsets():
    """q, k, v and a materialised mask whose batch offsets pass 2^31 elements: forward and backward."""
    H, Lq, Lk, D = 2, 24, 20, 16
    g = torch.Generator().manual_seed(14)
    st = _huge_storage(torch.float32, 3.0)
    q = _batch_view(st, 0, (H, Lq, D), torch.randn((3, H, Lq, D), generator=g))
    k = _batch_view(st, 4096, (H, Lk, D), torch.randn((3, H, Lk, D), generator=g))
    v = _batch_view(st, 8192, (H, Lk, D), torch.randn((3, H, Lk, D), generator=g))
    mask = _batch_view(st, 12288, (H, Lq, Lk), torch.randn((3, H, Lq, Lk), generator=g))
    assert q.stride(0) == k.stride(0) == mask.stride(0) == _BSTRIDE
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attention_ref(*leaves, mask)
    qg, kg, vg = (t.requires_grad_(True) for t in (q, k, v))
    out = _triton(qg, kg, vg, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    do = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (qg, kg, vg), do), torch.autograd.grad(ref, leaves, do)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
