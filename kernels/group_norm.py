"""GroupNorm (+ pre-norm residual add) (+ SiLU) forward and backward in Triton.

Same math as the C++/CUDA kernels (csrc/include/fastdiff/math/group_norm.h), for one sample b and one group g
of ``cpg`` channels with ``n`` positions each (N = cpg * n values)::

    v    = x + r + rc[b, c]           r: optional full residual (like x); rc: optional (B, C) residual
    mean = sum(v) / N,  var = sum((v - mean)^2) / N  (biased, like F.group_norm),  rstd = 1/sqrt(var + eps)
    z    = (v - mean) * rstd * w[c] + bias[c];   y = silu(z) if fused else z

Statistics in fp32 from per-channel shifted sums (shift = the channel's first value, so s2 - s1^2/n does not
cancel when |mean| >> std), merged over the group's channels exactly (Chan et al.).

Backward, with dz = dy * silu'(z) (or dy) and the per-channel sums sdz = sum(dz), sdzv = sum(dz * (v - mean))::

    Mg  = sum_c w_c sdz_c / N,   Mgx = rstd * sum_c w_c sdzv_c / N
    dv  = rstd * (dz * w - Mg - (v - mean) * rstd * Mgx)       (= dx = dr; drc[b, c] = sum over positions)
    dw  = sum_b rstd * sdzv,     dbias = sum_b sdz

Layouts: x is viewed as (B, C, n) with any strides (NCHW: channel stride n; channels_last: channel stride 1),
so both run without a copy; y and dx are written in x's layout. One program per (b, g) computes the statistics
(and the backward's sums); the normalisation is spread over (b, g, position blocks).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from fastdiff import settings

__all__ = ["group_norm_fwd", "group_norm_bwd", "configs", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 2048          # elements per (channels x positions) tile held in registers: 8 per thread at 8 warps
_TILE_BWD = 1024      # the backward keeps three accumulators and recomputes z: half the tile avoids spills
_NUM_WARPS = 8
_NUM_WARPS_BWD = 4    # with 8 warps ptxas spilled a few bytes at 32-64 channels per group (AOT, sm_89)


def _bwd_warps(dtype: torch.dtype) -> int:
    # fp16 is the exception: at 4 warps ptxas spilled 8 bytes for C/G<=4 with a residual; 8 warps spill nothing
    # for every fp16 configuration (AOT, sm_89), while bf16/fp32 spill at 8 warps (see above).
    return 8 if dtype == torch.float16 else _NUM_WARPS_BWD


def _interpreting() -> bool:
    return settings.current().triton_interpret


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
def _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C,
            HAS_R: tl.constexpr, HAS_RC: tl.constexpr):
    """v = x + r + rc for a (channels, positions) tile, in fp32; 0 outside the tile's valid part."""
    ok = c_ok[:, None] & p_ok[None, :]
    off = b * stride_b + c[:, None] * stride_c + p[None, :] * stride_n
    v = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_R:
        v += tl.load(R + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_RC:
        v += tl.load(RC + b * C + c, mask=c_ok, other=0.0)[:, None]
    return tl.where(ok, v, 0.0)


@triton.jit
def _gn_stats_kernel(
    X, R,               # input and optional full residual, (B, C, n) with strides (stride_b, stride_c, stride_n)
    RC,                 # optional (B, C) fp32 per-channel residual
    Mean, Rstd,         # (B, G) fp32 outputs
    stride_b, stride_c, stride_n,
    C, G, cpg, n, eps,
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)            # = b * G + g
    b = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    pp = tl.arange(0, BLOCK_N)
    # Shift of each channel: its value at position 0.
    shift = tl.sum(_load_v(X, R, RC, b, c, c_ok, pp, pp < 1, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC), 1)
    s1 = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_N):
        p = start + pp
        p_ok = p < n
        v = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC)
        d = tl.where(c_ok[:, None] & p_ok[None, :], v - shift[:, None], 0.0)
        s1 += d
        s2 += d * d
    s1c = tl.sum(s1, 1)
    s2c = tl.sum(s2, 1)
    mean_c = shift + s1c / n
    m2_c = tl.maximum(s2c - s1c * s1c / n, 0.0)
    mean = tl.sum(tl.where(c_ok, mean_c, 0.0), 0) / cpg
    dm = tl.where(c_ok, mean_c - mean, 0.0)
    m2 = tl.sum(tl.where(c_ok, m2_c, 0.0), 0) + n * tl.sum(dm * dm, 0)
    var = m2 / (n * cpg)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_apply_kernel(
    X, R, RC, W, Bias,  # W, Bias: optional (C,) fp32 affine
    Mean, Rstd,
    Y,                  # output in x's layout (same strides)
    stride_b, stride_c, stride_n,
    C, G, cpg, n,
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = p < n
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    v = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC)
    a = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    if HAS_W:
        a *= tl.load(W + c, mask=c_ok, other=0.0)
    z = (v - mean) * a[:, None]
    if HAS_B:
        z += tl.load(Bias + c, mask=c_ok, other=0.0)[:, None]
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    off = b * stride_b + c[:, None] * stride_c + p[None, :] * stride_n
    tl.store(Y + off, _cast_out(z, Y.dtype.element_ty, UPCAST), mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def _gn_bwd_kernel(
    X, R, RC, W, Bias, Mean, Rstd,
    DY,                 # upstream gradient, x's layout
    DX,                 # output: d x (= d residual), x's layout
    DWp, DBp,           # (B, C) fp32 partial dw = rstd * sdzv and dbias = sdz (summed over the batch by torch)
    DRC,                # optional (B, C) fp32 output: d rc = sum over positions of dx
    stride_b, stride_c, stride_n,
    C, G, cpg, n,
    HAS_R: tl.constexpr, HAS_RC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    c = g * cpg + cc
    c_ok = cc < cpg
    pp = tl.arange(0, BLOCK_N)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=c_ok, other=0.0)
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        bias = tl.load(Bias + c, mask=c_ok, other=0.0)

    # Pass 1: per-channel sums of dz and dz * (v - mean).
    sdz = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    sdzv = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_N):
        p = start + pp
        p_ok = p < n
        ok = c_ok[:, None] & p_ok[None, :]
        off = b * stride_b + c[:, None] * stride_c + p[None, :] * stride_n
        vc = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC) - mean
        dz = tl.load(DY + off, mask=ok, other=0.0).to(tl.float32)
        if SILU:
            z = vc * (rstd * w)[:, None] + bias[:, None]
            sg = 1.0 / (1.0 + tl.exp(-z))
            dz = dz * sg * (1.0 + z * (1.0 - sg))
        dz = tl.where(ok, dz, 0.0)
        sdz += dz
        sdzv += dz * vc
    sdz_c = tl.sum(sdz, 1)
    sdzv_c = tl.sum(sdzv, 1)
    tl.store(DWp + b * C + c, rstd * sdzv_c, mask=c_ok)
    tl.store(DBp + b * C + c, sdz_c, mask=c_ok)
    inv_count = 1.0 / (n * cpg)
    mg = tl.sum(tl.where(c_ok, w * sdz_c, 0.0), 0) * inv_count
    mgx = rstd * tl.sum(tl.where(c_ok, w * sdzv_c, 0.0), 0) * inv_count

    # Pass 2: dv = rstd * (dz * w - Mg - (v - mean) * rstd * Mgx).
    drc = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_N):
        p = start + pp
        p_ok = p < n
        ok = c_ok[:, None] & p_ok[None, :]
        off = b * stride_b + c[:, None] * stride_c + p[None, :] * stride_n
        vc = _load_v(X, R, RC, b, c, c_ok, p, p_ok, stride_b, stride_c, stride_n, C, HAS_R, HAS_RC) - mean
        dz = tl.load(DY + off, mask=ok, other=0.0).to(tl.float32)
        if SILU:
            z = vc * (rstd * w)[:, None] + bias[:, None]
            sg = 1.0 / (1.0 + tl.exp(-z))
            dz = dz * sg * (1.0 + z * (1.0 - sg))
        dv = rstd * (dz * w[:, None] - mg - vc * (rstd * mgx))
        dv = tl.where(ok, dv, 0.0)
        if HAS_RC:
            drc += dv
        tl.store(DX + off, _cast_out(dv, DX.dtype.element_ty, UPCAST), mask=ok)
    if HAS_RC:
        tl.store(DRC + b * C + c, tl.sum(drc, 1), mask=c_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _blocks(cpg: int, tile: int = _TILE) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cpg)
    return block_c, max(16, tile // block_c)


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
    if x.device.type != "cuda" and not _interpreting():
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


def _common(x, num_groups, weight, bias, residual, channel_residual):
    _check(x, num_groups, weight, bias, residual, channel_residual)
    x, strides = _view3(x)
    if residual is not None and residual.stride() != x.stride():
        residual = torch.empty_like(x).copy_(residual)   # the kernels index x and r with one set of strides
    B, C = x.shape[:2]
    n = x[0, 0].numel() if x.dim() > 2 else 1
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    return x, strides, residual, f32(weight), f32(bias), f32(channel_residual), B, C, n


def group_norm_fwd(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, residual=None,
                   channel_residual=None):
    """Returns ``(y, mean, rstd)``: y in x's dtype and layout, mean/rstd (B, G) fp32 for the backward."""
    x, (sb, sc, sn), r, w, bb, rc, B, C, n = _common(x, num_groups, weight, bias, residual, channel_residual)
    G = num_groups
    cpg = C // G
    y = torch.empty_like(x)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, G), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean, rstd
    block_c, block_n = _blocks(cpg)
    dummy = mean
    flags = dict(HAS_R=r is not None, HAS_RC=rc is not None, BLOCK_C=block_c, BLOCK_N=block_n)
    _gn_stats_kernel[(B * G,)](x, r if r is not None else x, rc if rc is not None else dummy, mean, rstd,
                               sb, sc, sn, C, G, cpg, n, float(eps), **flags, num_warps=_NUM_WARPS)
    _gn_apply_kernel[(B * G, triton.cdiv(n, block_n))](
        x, r if r is not None else x, rc if rc is not None else dummy, w if w is not None else dummy,
        bb if bb is not None else dummy, mean, rstd, y, sb, sc, sn, C, G, cpg, n,
        HAS_W=w is not None, HAS_B=bb is not None, SILU=bool(silu), UPCAST=_interpreting(), **flags,
        num_warps=_NUM_WARPS)
    return y, mean, rstd


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, silu=False, residual=None, channel_residual=None):
    """Returns ``(dx, dweight, dbias, dchannel_residual)`` (dx is also the residual's gradient)."""
    x, (sb, sc, sn), r, w, bb, rc, B, C, n = _common(x, num_groups, weight, bias, residual, channel_residual)
    G = num_groups
    cpg = C // G
    dy = torch.empty_like(x).copy_(dy) if dy.stride() != x.stride() else dy
    dx = torch.empty_like(x)
    dwp = torch.empty((B, C), dtype=torch.float32, device=x.device)
    dbp = torch.empty((B, C), dtype=torch.float32, device=x.device)
    drc = torch.empty((B, C), dtype=torch.float32, device=x.device) if rc is not None else None
    if x.numel() == 0:
        return dx, dwp.sum(0), dbp.sum(0), drc
    block_c, block_n = _blocks(cpg, _TILE_BWD)
    dummy = mean
    _gn_bwd_kernel[(B * G,)](
        x, r if r is not None else x, rc if rc is not None else dummy, w if w is not None else dummy,
        bb if bb is not None else dummy, mean, rstd, dy, dx, dwp, dbp, drc if drc is not None else dummy,
        sb, sc, sn, C, G, cpg, n,
        HAS_R=r is not None, HAS_RC=rc is not None, HAS_W=w is not None, HAS_B=bb is not None, SILU=bool(silu),
        BLOCK_C=block_c, BLOCK_N=block_n, UPCAST=_interpreting(), num_warps=_bwd_warps(x.dtype))
    dw = dwp.sum(0) if weight is not None else None
    db = dbp.sum(0) if bias is not None else None
    return dx, dw, db, drc


def configs() -> list[dict]:
    """Configurations dispatch can launch: the SD1/SD3/VAE channels-per-group (BLOCK_C 1..64), per dtype and
    the flags that change register use (residual, SILU; weight and bias are always given by the modules)."""
    out = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for block_c in (1, 2, 4, 8, 16, 32, 64):
            for has_r in (False, True):
                for silu in (False, True):
                    for kind, kernel in (("stats", _gn_stats_kernel), ("apply", _gn_apply_kernel),
                                         ("bwd", _gn_bwd_kernel)):
                        if kind == "stats" and silu:
                            continue
                        block_n = _blocks(block_c, _TILE_BWD if kind == "bwd" else _TILE)[1]
                        constexprs = dict(HAS_R=has_r, HAS_RC=True, BLOCK_C=block_c, BLOCK_N=block_n)
                        if kind != "stats":
                            constexprs.update(HAS_W=True, HAS_B=True, SILU=silu, UPCAST=False)
                        sig = {}
                        for name in kernel.arg_names:
                            if name in constexprs:
                                sig[name] = "constexpr"
                            elif name in ("X", "R", "Y", "DY", "DX"):
                                sig[name] = "*" + ty
                            elif name in ("RC", "W", "Bias", "Mean", "Rstd", "DWp", "DBp", "DRC"):
                                sig[name] = "*fp32"
                            elif name == "eps":
                                sig[name] = "fp32"
                            else:
                                sig[name] = "i32"
                        out.append(dict(kernel=kernel, name=f"group_norm_{kind}",
                                        key=f"{ty} C/G<={block_c} res={int(has_r)}" + (f" silu={int(silu)}" if kind != "stats" else ""),
                                        signature=sig, constexprs=constexprs,
                                        num_warps=_bwd_warps(dtype) if kind == "bwd" else _NUM_WARPS, num_stages=1))
    return out
