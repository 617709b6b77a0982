"""GroupNorm (+ pre-norm residual add) (+ SiLU) forward and backward in Triton.

Same math as the C++/CUDA kernels (csrc/include/fastdiff/math/group_norm.h), for one sample b and one group g
of ``cpg`` channels with ``n`` positions each (N = cpg * n values)::

    v    = x + r + rc[b, c]           r: optional full residual (like x); rc: optional (B, C) residual
    mean = sum(v) / N,  var = sum((v - mean)^2) / N  (biased, like F.group_norm),  rstd = 1/sqrt(var + eps)
    z    = (v - mean) * rstd * w[c] + bias[c];   y = silu(z) if fused else z

Statistics in fp32 from per-channel shifted sums (shift = the channel's first value, so s2 - s1^2/n does not
cancel when |mean| >> std), merged over the group's channels exactly (Chan et al.).

Backward, with dz = dy * silu'(z) (or dy) and the per-channel sums sdz = sum(dz), sdzv = sum(dz * (v - mean)),
sv = sum(v - mean)::

    Mg  = sum_c w_c sdz_c / N,   Mgx = rstd * sum_c w_c sdzv_c / N
    dv  = rstd * (dz * w - Mg - (v - mean) * rstd * Mgx)       (= dx = dr)
    drc = sum over positions of dv = rstd * (w sdz - n Mg - rstd Mgx sv)
    dw  = sum_b rstd * sdzv,     dbias = sum_b sdz

Layouts: x is viewed as (B, C, n) with any strides (NCHW: channel stride n; channels_last: channel stride 1),
so both run without a copy; y and dx are written in x's layout (an x with gaps, e.g. a slice along the batch,
is copied to a dense layout first). Offsets are int64: a tensor may pass 2^31 elements (a 1024x1024 VAE decode
at batch 9 in its 256-channel layers).

Parallelism: the reductions are split over (b, g, chunk of positions), one program each, so that a B = 1 VAE
decode (32 groups) still fills the GPU: every chunk reduces to per-channel partial sums with the same shift
(the channel's value at position 0), so the chunks' sums simply add; a second kernel, one program per (b, g),
merges them into the group's statistics (forward) or Mg, Mgx and the parameter gradients (backward). The
elementwise passes run over (b, g, position block). Every grid is one axis, folded, so no shape meets CUDA's
65535 limit on grid axes y and z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels._launch import check_grid, interpreting, on_device, sm_count

__all__ = ["group_norm_fwd", "group_norm_bwd", "configs", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 2048          # elements per (channels x positions) tile held in registers: 8 per thread at 8 warps
_TILE_BWD = 1024      # the backward keeps three accumulators and recomputes z: half the tile avoids spills
_NUM_WARPS = 8
_NUM_WARPS_BWD = 4    # with 8 warps ptxas spilled a few bytes at 32-64 channels per group (AOT, sm_89)
_PROGRAMS_PER_SM = 4  # reductions are split until (b, g, chunk) programs give every SM about this many
_MAX_SPLITS = 64      # the merge kernels loop over the chunks one by one


def _bwd_warps(dtype: torch.dtype) -> int:
    # fp16 is the exception: at 4 warps ptxas spilled 8 bytes for C/G<=4 with a residual; 8 warps spill nothing
    # for every fp16 configuration (AOT, sm_89), while bf16/fp32 spill at 8 warps (see above).
    return 8 if dtype == torch.float16 else _NUM_WARPS_BWD


@triton.jit
def _cast_out(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): round by hand there.
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _offsets(b, c, p, stride_b, stride_c, stride_n):
    """int64 offsets of the (channels c, positions p) tile of sample b (int32 products would wrap past 2^31)."""
    return b.to(tl.int64) * stride_b + c.to(tl.int64)[:, None] * stride_c + p.to(tl.int64)[None, :] * stride_n


@triton.jit
def _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C,
            HAS_R: tl.constexpr, HAS_RC: tl.constexpr):
    """v = x + r + rc for a (channels, positions) tile, in fp32; 0 outside the tile's valid part."""
    ok = c_ok[:, None] & p_ok[None, :]
    off = _offsets(b, c, p, stride_b, stride_c, stride_n)
    v = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_R:
        v += tl.load(R + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_RC:
        v += tl.load(RC + b * C + c, mask=c_ok, other=0.0)[:, None]
    return tl.where(ok, v, 0.0)


@triton.jit
def _gn_stats_partial_kernel(
    X, R,               # input and optional full residual, (B, C, n) with strides (stride_b, stride_c, stride_n)
    RC,                 # optional (B, C) fp32 per-channel residual
    Part,               # (B*G*S, 2, cpg) fp32 output: per-channel shifted sums s1, s2 over one chunk
    Shift,              # (B, C) fp32 output: each channel's shift, its v at position 0 (stored by chunk 0)
    stride_b, stride_c, stride_n,
    C, G, cpg, n,
    S, chunk,           # chunks per group, positions per chunk (a multiple of BLOCK_N)
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)            # = (b * G + g) * S + chunk index
    bg = pid // S
    s = pid % S
    b = bg // G
    g = bg % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    pp = tl.arange(0, BLOCK_N)
    # Every chunk shifts by the same value (the channel's v at position 0), so the chunks' sums add exactly.
    shift = tl.sum(_load_v(X, R, RC, b, c, c_ok, pp, pp < 1, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC), 1)
    s1 = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    start = s * chunk
    end = tl.minimum(start + chunk, n)
    for p0 in range(start, end, BLOCK_N):
        p = p0 + pp
        p_ok = p < end
        v = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC)
        d = tl.where(c_ok[:, None] & p_ok[None, :], v - shift[:, None], 0.0)
        s1 += d
        s2 += d * d
    out = Part + pid * 2 * cpg + cc
    tl.store(out, tl.sum(s1, 1), mask=c_ok)
    tl.store(out + cpg, tl.sum(s2, 1), mask=c_ok)
    tl.store(Shift + b * C + c, shift, mask=c_ok & (s == 0))


@triton.jit
def _gn_stats_merge_kernel(
    Part, Shift,        # from _gn_stats_partial_kernel
    Mean, Rstd,         # (B, G) fp32 outputs
    C, G, cpg, n, S, eps,
    BLOCK_C: tl.constexpr,
):
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    cc = tl.arange(0, BLOCK_C)
    c_ok = cc < cpg
    s1c = tl.zeros([BLOCK_C], tl.float32)
    s2c = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        src = Part + (bg * S + s) * 2 * cpg + cc
        s1c += tl.load(src, mask=c_ok, other=0.0)
        s2c += tl.load(src + cpg, mask=c_ok, other=0.0)
    shift = tl.load(Shift + b * C + g * cpg + cc, mask=c_ok, other=0.0)
    nf = n * 1.0
    mean_c = shift + s1c / nf
    m2_c = tl.maximum(s2c - s1c * s1c / nf, 0.0)
    mean = tl.sum(tl.where(c_ok, mean_c, 0.0), 0) / cpg
    dm = tl.where(c_ok, mean_c - mean, 0.0)
    m2 = tl.sum(tl.where(c_ok, m2_c, 0.0), 0) + nf * tl.sum(dm * dm, 0)
    var = m2 / (nf * cpg)
    tl.store(Mean + bg, mean)
    tl.store(Rstd + bg, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_tile(G, cpg, n, nblk, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of one program of the apply kernels: program id = (b * G + g) * nblk + position block.
    Returns the (b, g) row index, b, the group's channels and positions, and their masks."""
    pid = tl.program_id(0)
    bg = pid // nblk
    b = bg // G
    g = bg % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    p = (pid % nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = p < n
    return bg, b, c, c_ok, p, p_ok


@triton.jit
def _gn_apply_kernel(
    X, R, RC, W, Bias,  # W, Bias: optional (C,) fp32 affine
    Mean, Rstd,
    Y,                  # output in x's layout (same strides)
    stride_b, stride_c, stride_n,
    C, G, cpg, n, nblk,  # nblk: position blocks per group
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    bg, b, c, c_ok, p, p_ok = _apply_tile(G, cpg, n, nblk, BLOCK_C, BLOCK_N)
    mean = tl.load(Mean + bg)
    rstd = tl.load(Rstd + bg)
    v = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC)
    a = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    if HAS_W:
        a *= tl.load(W + c, mask=c_ok, other=0.0)
    z = (v - mean) * a[:, None]
    if HAS_B:
        z += tl.load(Bias + c, mask=c_ok, other=0.0)[:, None]
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    off = _offsets(b, c, p, stride_b, stride_c, stride_n)
    tl.store(Y + off, _cast_out(z, Y.dtype.element_ty, UPCAST), mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def _gn_dz(X, R, RC, DY, b, c, c_ok, p, p_ok, mean, rstd, w, bias, stride_b, stride_c, stride_n, C,
           HAS_R: tl.constexpr, HAS_RC: tl.constexpr, SILU: tl.constexpr):
    """(v - mean, dz) for a tile, dz = dy * silu'(z) (or dy); both 0 outside the tile's valid part."""
    ok = c_ok[:, None] & p_ok[None, :]
    vc = tl.where(ok, _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC)
                  - mean, 0.0)
    dz = tl.load(DY + _offsets(b, c, p, stride_b, stride_c, stride_n), mask=ok, other=0.0).to(tl.float32)
    if SILU:
        z = vc * (rstd * w)[:, None] + bias[:, None]
        sg = 1.0 / (1.0 + tl.exp(-z))
        dz = dz * sg * (1.0 + z * (1.0 - sg))
    return vc, tl.where(ok, dz, 0.0)


@triton.jit
def _gn_bwd_partial_kernel(
    X, R, RC, W, Bias, Mean, Rstd,
    DY,                 # upstream gradient, x's layout
    Part,               # (B*G*S, 3, cpg) fp32 output: per-channel sdz, sdzv, sv over one chunk
    stride_b, stride_c, stride_n,
    C, G, cpg, n, S, chunk,
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)            # = (b * G + g) * S + chunk index
    bg = pid // S
    s = pid % S
    b = bg // G
    g = bg % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    pp = tl.arange(0, BLOCK_N)
    mean = tl.load(Mean + bg)
    rstd = tl.load(Rstd + bg)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0)
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        bias = tl.load(Bias + c, mask=c_ok, other=0.0)
    sdz = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    sdzv = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    sv = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    start = s * chunk
    end = tl.minimum(start + chunk, n)
    for p0 in range(start, end, BLOCK_N):
        p = p0 + pp
        vc, dz = _gn_dz(X, R, RC, DY, b, c, c_ok, p, p < end, mean, rstd, w, bias, stride_b, stride_c, stride_n,
                        C, HAS_R, HAS_RC, SILU)
        sdz += dz
        sdzv += dz * vc
        sv += vc
    out = Part + pid * 3 * cpg + cc
    tl.store(out, tl.sum(sdz, 1), mask=c_ok)
    tl.store(out + cpg, tl.sum(sdzv, 1), mask=c_ok)
    tl.store(out + 2 * cpg, tl.sum(sv, 1), mask=c_ok)


@triton.jit
def _gn_bwd_merge_kernel(
    Part,               # from _gn_bwd_partial_kernel
    W, Rstd,
    DWp, DBp,           # (B, C) fp32 outputs: partial dw = rstd * sdzv and dbias = sdz (summed over the batch by torch)
    DRC,                # optional (B, C) fp32 output: d rc = sum over the positions of dv
    Coef,               # (B*G, 2) fp32 output: Mg, Mgx of each group
    C, G, cpg, n, S,
    HAS_W: tl.constexpr, HAS_RC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    sdz = tl.zeros([BLOCK_C], tl.float32)
    sdzv = tl.zeros([BLOCK_C], tl.float32)
    sv = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        src = Part + (bg * S + s) * 3 * cpg + cc
        sdz += tl.load(src, mask=c_ok, other=0.0)
        sdzv += tl.load(src + cpg, mask=c_ok, other=0.0)
        sv += tl.load(src + 2 * cpg, mask=c_ok, other=0.0)
    rstd = tl.load(Rstd + bg)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0)
    tl.store(DWp + b * C + c, rstd * sdzv, mask=c_ok)
    tl.store(DBp + b * C + c, sdz, mask=c_ok)
    nf = n * 1.0
    inv_count = 1.0 / (nf * cpg)
    mg = tl.sum(tl.where(c_ok, w * sdz, 0.0), 0) * inv_count
    mgx = rstd * tl.sum(tl.where(c_ok, w * sdzv, 0.0), 0) * inv_count
    tl.store(Coef + 2 * bg, mg)
    tl.store(Coef + 2 * bg + 1, mgx)
    if HAS_RC:
        # sum over the positions of dv = rstd * (dz * w - Mg - (v - mean) * rstd * Mgx)
        tl.store(DRC + b * C + c, rstd * (w * sdz - nf * mg - sv * (rstd * mgx)), mask=c_ok)


@triton.jit
def _gn_bwd_apply_kernel(
    X, R, RC, W, Bias, Mean, Rstd,
    Coef,               # (B*G, 2) fp32: Mg, Mgx from _gn_bwd_merge_kernel
    DY,                 # upstream gradient, x's layout
    DX,                 # output: d x (= d residual), x's layout
    stride_b, stride_c, stride_n,
    C, G, cpg, n, nblk,
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    bg, b, c, c_ok, p, p_ok = _apply_tile(G, cpg, n, nblk, BLOCK_C, BLOCK_N)
    mean = tl.load(Mean + bg)
    rstd = tl.load(Rstd + bg)
    mg = tl.load(Coef + 2 * bg)
    mgx = tl.load(Coef + 2 * bg + 1)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0)
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        bias = tl.load(Bias + c, mask=c_ok, other=0.0)
    vc, dz = _gn_dz(X, R, RC, DY, b, c, c_ok, p, p_ok, mean, rstd, w, bias, stride_b, stride_c, stride_n, C,
                    HAS_R, HAS_RC, SILU)
    # dv = rstd * (dz * w - Mg - (v - mean) * rstd * Mgx)
    dv = rstd * (dz * w[:, None] - mg - vc * (rstd * mgx))
    off = _offsets(b, c, p, stride_b, stride_c, stride_n)
    tl.store(DX + off, _cast_out(dv, DX.dtype.element_ty, UPCAST), mask=c_ok[:, None] & p_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _blocks(cpg: int, tile: int = _TILE) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cpg)
    return block_c, max(16, tile // block_c)


def _splits(groups: int, n: int, block_n: int, sms: int) -> tuple[int, int]:
    """``(S, chunk)``: each of the ``groups`` (b, g) reductions over n positions is split into S chunks of
    ``chunk`` positions (whole BLOCK_N tiles), enough for ``groups * S`` programs to give every SM
    _PROGRAMS_PER_SM of them (a B = 1 decode has 32 groups for 76+ SMs), at most _MAX_SPLITS."""
    tiles = triton.cdiv(n, block_n)
    s = max(1, min(triton.cdiv(sms * _PROGRAMS_PER_SM, groups), tiles, _MAX_SPLITS))
    per = triton.cdiv(tiles, s)
    return triton.cdiv(tiles, per), per * block_n


def _view3(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, *spatial) -> strides of its (B, C, n) view without a copy when the spatial dims are dense
    (NCHW-contiguous or channels_last); otherwise a contiguous copy."""
    if t.dim() == 2:
        return t, (t.stride(0), t.stride(1), 1)
    sp = t.shape[2:]
    st = t.stride()[2:]
    # dense spatial block: strides of the spatial dims are those of a contiguous tensor times st[-1]
    exp, dense = st[-1], True
    for size, stride in zip(reversed(sp), reversed(st)):
        if size != 1 and stride != exp:
            dense = False
        exp *= size
    if not dense:
        t = t.contiguous()
        return t, (t.stride(0), t.stride(1), 1)
    return t, (t.stride(0), t.stride(1), st[-1])


def _check(x, num_groups, weight, bias, residual, channel_residual):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm (triton): dtype {x.dtype} unsupported (fp32, bf16, fp16)")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("group_norm (triton): CUDA tensors only (CPU only under TRITON_INTERPRET=1)")
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm (triton): channels {x.shape[1] if x.dim() > 1 else None} not divisible by "
                         f"{num_groups} groups")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("group_norm (triton): residual must have x's shape and dtype")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (x.shape[1],):
            raise ValueError(f"group_norm (triton): {name} must have shape ({x.shape[1]},)")
    if channel_residual is not None and channel_residual.shape != x.shape[:2]:
        raise ValueError(f"group_norm (triton): channel_residual must have shape {tuple(x.shape[:2])}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual),
                    ("channel_residual", channel_residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"group_norm (triton): {name} is on {t.device}, x on {x.device}")


def _common(x, num_groups, weight, bias, residual, channel_residual):
    _check(x, num_groups, weight, bias, residual, channel_residual)
    x, strides = _view3(x)
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        # x has gaps or overlaps (e.g. a slice along the batch): y and dx are written with x's strides, so
        # x goes to out's dense layout first.
        x = out.copy_(x)
        out = torch.empty_like(x)
        x, strides = _view3(x)
    if residual is not None and residual.stride() != x.stride():
        residual = torch.empty_like(x).copy_(residual)   # the kernels index x and r with one set of strides
    B, C = x.shape[:2]
    n = x[0, 0].numel() if x.dim() > 2 else 1
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    return x, strides, out, residual, f32(weight), f32(bias), f32(channel_residual), B, C, n


def group_norm_fwd(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, residual=None,
                   channel_residual=None):
    """Returns ``(y, mean, rstd)``: y in x's dtype and layout, mean/rstd (B, G) fp32 for the backward."""
    x, strides, y, r, w, bb, rc, B, C, n = _common(x, num_groups, weight, bias, residual, channel_residual)
    mean = torch.empty((B, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, num_groups), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        _launch_fwd(x, strides, r, w, bb, rc, y, mean, rstd, num_groups, n, float(eps), bool(silu))
    return y, mean, rstd


def _launch_fwd(x, strides, r, w, bb, rc, y, mean, rstd, G, n, eps, silu):
    """The forward's three launches. x, r and y share ``strides`` (the (B, C, n) view's); w, bb, rc fp32."""
    B, C = x.shape[:2]
    cpg = C // G
    sb, sc, sn = strides
    block_c, block_n = _blocks(cpg)
    S, chunk = _splits(B * G, n, block_n, sm_count(x.device))
    nblk = triton.cdiv(n, block_n)
    part = torch.empty((B * G * S, 2, cpg), dtype=torch.float32, device=x.device)
    shift = torch.empty((B, C), dtype=torch.float32, device=x.device)
    dummy = mean
    r_ = r if r is not None else x
    rc_ = rc if rc is not None else dummy
    flags = dict(HAS_R=r is not None, HAS_RC=rc is not None, BLOCK_C=block_c, BLOCK_N=block_n)
    with on_device(x):
        _gn_stats_partial_kernel[check_grid((B * G * S,), "group_norm stats")](
            x, r_, rc_, part, shift, sb, sc, sn, C, G, cpg, n, S, chunk, **flags, num_warps=_NUM_WARPS)
        _gn_stats_merge_kernel[check_grid((B * G,), "group_norm stats merge")](
            part, shift, mean, rstd, C, G, cpg, n, S, eps, BLOCK_C=block_c, num_warps=1)
        _gn_apply_kernel[check_grid((B * G * nblk,), "group_norm apply")](
            x, r_, rc_, w if w is not None else dummy, bb if bb is not None else dummy, mean, rstd, y,
            sb, sc, sn, C, G, cpg, n, nblk, HAS_W=w is not None, HAS_B=bb is not None, SILU=silu,
            UPCAST=interpreting(), **flags, num_warps=_NUM_WARPS)


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, silu=False, residual=None, channel_residual=None):
    """Returns ``(dx, dweight, dbias, dchannel_residual)`` (dx is also the residual's gradient)."""
    x, strides, dx, r, w, bb, rc, B, C, n = _common(x, num_groups, weight, bias, residual, channel_residual)
    if dy.device != x.device:
        raise ValueError(f"group_norm (triton): grad is on {dy.device}, x on {x.device}")
    dy = torch.empty_like(x).copy_(dy) if dy.stride() != x.stride() else dy
    dwp = torch.empty((B, C), dtype=torch.float32, device=x.device)
    dbp = torch.empty((B, C), dtype=torch.float32, device=x.device)
    drc = torch.empty((B, C), dtype=torch.float32, device=x.device) if rc is not None else None
    if x.numel() > 0:
        _launch_bwd(dy, x, strides, r, w, bb, rc, mean, rstd, dx, dwp, dbp, drc, num_groups, n, bool(silu))
    dw = dwp.sum(0) if weight is not None else None
    db = dbp.sum(0) if bias is not None else None
    return dx, dw, db, drc


def _launch_bwd(dy, x, strides, r, w, bb, rc, mean, rstd, dx, dwp, dbp, drc, G, n, silu):
    """The backward's three launches. dy, x, r and dx share ``strides``; w, bb, rc, mean, rstd fp32."""
    B, C = x.shape[:2]
    cpg = C // G
    sb, sc, sn = strides
    block_c, block_n = _blocks(cpg, _TILE_BWD)
    S, chunk = _splits(B * G, n, block_n, sm_count(x.device))
    nblk = triton.cdiv(n, block_n)
    part = torch.empty((B * G * S, 3, cpg), dtype=torch.float32, device=x.device)
    coef = torch.empty((B * G, 2), dtype=torch.float32, device=x.device)
    dummy = mean
    common = (x, r if r is not None else x, rc if rc is not None else dummy, w if w is not None else dummy,
              bb if bb is not None else dummy, mean, rstd)
    flags = dict(HAS_R=r is not None, HAS_RC=rc is not None, HAS_W=w is not None, HAS_B=bb is not None, SILU=silu,
                 BLOCK_C=block_c, BLOCK_N=block_n)
    warps = _bwd_warps(x.dtype)
    with on_device(x):
        _gn_bwd_partial_kernel[check_grid((B * G * S,), "group_norm backward sums")](
            *common, dy, part, sb, sc, sn, C, G, cpg, n, S, chunk, **flags, num_warps=warps)
        _gn_bwd_merge_kernel[check_grid((B * G,), "group_norm backward merge")](
            part, w if w is not None else dummy, rstd, dwp, dbp, drc if drc is not None else dummy, coef,
            C, G, cpg, n, S, HAS_W=w is not None, HAS_RC=rc is not None, BLOCK_C=block_c, num_warps=1)
        _gn_bwd_apply_kernel[check_grid((B * G * nblk,), "group_norm backward apply")](
            *common, coef, dy, dx, sb, sc, sn, C, G, cpg, n, nblk, **flags, UPCAST=interpreting(),
            num_warps=warps)

def configs() -> list[dict]:
    """Configurations dispatch can launch: the SD1/SD3/VAE channels-per-group (BLOCK_C 1..64), per dtype and
    the flags that change register use (residual, SILU; weight and bias are always given by the modules)."""
    kernels = {"stats": _gn_stats_partial_kernel, "apply": _gn_apply_kernel, "bwd_sums": _gn_bwd_partial_kernel,
               "bwd_apply": _gn_bwd_apply_kernel}
    out = []
    for block_c in (1, 2, 4, 8, 16, 32, 64):
        # the merge kernels read only fp32 partial sums: one configuration per BLOCK_C
        for kind, kernel, constexprs in (
                ("stats_merge", _gn_stats_merge_kernel, dict(BLOCK_C=block_c)),
                ("bwd_merge", _gn_bwd_merge_kernel, dict(HAS_W=True, HAS_RC=True, BLOCK_C=block_c))):
            out.append(dict(kernel=kernel, name=f"group_norm_{kind}", key=f"C/G<={block_c}",
                            signature=_signature(kernel, constexprs, "fp32"), constexprs=constexprs, num_warps=1,
                            num_stages=1))
    for dtype, ty in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for block_c in (1, 2, 4, 8, 16, 32, 64):
            for has_r in (False, True):
                for silu in (False, True):
                    for kind, kernel in kernels.items():
                        if kind == "stats" and silu:
                            continue
                        bwd = kind.startswith("bwd")
                        block_n = _blocks(block_c, _TILE_BWD if bwd else _TILE)[1]
                        constexprs = dict(HAS_R=has_r, HAS_RC=True, BLOCK_C=block_c, BLOCK_N=block_n)
                        if kind != "stats":
                            constexprs.update(HAS_W=True, HAS_B=True, SILU=silu)
                        if kind.endswith("apply"):
                            constexprs.update(UPCAST=False)
                        out.append(dict(kernel=kernel, name=f"group_norm_{kind}",
                                        key=f"{ty} C/G<={block_c} res={int(has_r)}" + (f" silu={int(silu)}" if kind != "stats" else ""),
                                        signature=_signature(kernel, constexprs, ty), constexprs=constexprs,
                                        num_warps=_bwd_warps(dtype) if bwd else _NUM_WARPS, num_stages=1))
    return out


def _signature(kernel, constexprs: dict, ty: str) -> dict:
    """Triton signature of a GroupNorm kernel: tensors of x's layout in ``ty``, parameters and sums in fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("X", "R", "Y", "DY", "DX"):
            sig[name] = "*" + ty
        elif name in ("RC", "W", "Bias", "Mean", "Rstd", "DWp", "DBp", "DRC", "Part", "Shift", "Coef"):
            sig[name] = "*fp32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig
