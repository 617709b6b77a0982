"""Flash attention (forward and backward) in Triton, for the layout of ``F.scaled_dot_product_attention``.

q: (B, H, Lq, D), k and v: (B, H, Lk, D); self-attention (Lq == Lk) and cross-attention (Lq != Lk, e.g. the
77 text tokens of SD1). Head dims that are not a power of two (SD1: 40, 80, 160) are padded to the next
power of two ``BLOCK_D`` inside the kernel: the padded lanes load 0, so they add nothing to q.k^T and are
never stored.

The math (FlashAttention-2, Dao 2023), per query row i and in base 2 so the kernel uses ``exp2``::

    s_ij = (q_i . k_j) * scale * log2(e)  [+ mask_ij * log2(e)]
    m_i  = max_j s_ij;   l_i = sum_j 2^(s_ij - m_i);   o_i = sum_j 2^(s_ij - m_i) v_j / l_i
    lse_i = m_i + log2(l_i)                  (saved for the backward, in log2 units)

The forward streams over key blocks with an online softmax (running max ``m`` and sum ``l``, rescaling the
accumulator by ``2^(m_old - m_new)``). The backward recomputes ``p_ij = 2^(s_ij - lse_i)`` block by block::

    delta_i = sum_d dO_id * O_id
    dV = P^T dO;   dP = dO V^T;   dS = P * (dP - delta);   dQ = scale * dS K;   dK = scale * dS^T Q

with one kernel for dK/dV (a program per key block, looping over query blocks) and one for dQ (a program
per query block, looping over key blocks): no atomics, deterministic.

A query row whose keys are all masked out (``-inf`` everywhere) gets output 0 and zero gradients; the
reference :func:`fastdiff.ops.attention.attention_ref` defines the same result.

Offsets are int32 inside a launch, as the block sizes below were tuned for (int64 offsets add registers, and
these kernels run at the 255-register limit): a batch whose offsets would pass 2^31 elements (a materialised
mask above all) is launched in chunks of samples, each from its own base pointers, which also keeps grid axis y
(B * H) within CUDA's 65535.

Block sizes were chosen from ahead-of-time compiles for sm_89 (RTX 4080): no register spills, shared memory
within the 99 KB per-block limit (``tests/test_triton_aot.py`` checks every configuration listed by
:func:`configs`, ``python -m fastdiff.kernels.report`` prints registers, shared memory and occupancy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels._launch import MAX_GRID, interpreting, on_device

__all__ = [
    "flash_attention_fwd",
    "flash_attention_bwd",
    "kernel_config",
    "aot_entry",
    "configs",
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
    "MAX_HEAD_DIM_FP32",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_FP32 = 128
_LOG2E = 1.4426950408889634


@triton.jit
def _to_out(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Cast an fp32 tile for storing. The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest
    even), so under it round to nearest even by hand first, which makes the final cast exact."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,            # inputs (B, H, L, D); the last dim has stride 1, the others any stride
    Mask,               # fp32 additive mask broadcast to (B, H, Lq, Lk) by strides (0 on broadcast dims)
    Out,                # (B, H, Lq, D) output, contiguous, dtype of q
    Lse,                # (B*H, Lq) fp32: log2-sum-exp2 of each row of s, saved for the backward
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    H, Lq, Lk, D,
    qk_scale,           # scale * log2(e): scores go straight to the exp2 domain
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,      # interpreter only: tl.dot on 16-bit inputs is wrong there, compute in fp32
    DOT_PRECISION: tl.constexpr,   # "ieee" or "tf32" for fp32 inputs (ignored for 16-bit inputs)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < Lk
        # k loaded transposed, (BLOCK_D, BLOCK_N), so s = q @ kT needs no transpose in registers.
        kT = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            mk = tl.load(mask_base + offs_m[:, None] * stride_mm + n[None, :] * stride_mn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += mk * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key masked so far has m_new = -inf: shift by 0 instead so that 2^(-inf - 0) = 0
        # rather than 2^(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0   # every key masked: output 0, and lse = +inf makes the backward's p exactly 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, _to_out(out, Out.dtype.element_ty, UPCAST), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask,
    DO,                 # (B, H, Lq, D) upstream gradient, contiguous
    Lse, Delta,         # (B*H, Lq) fp32: forward lse (log2 units) and rowsum(dO * O)
    DK, DV,             # (B, H, Lk, D) outputs, contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    H, Lq, Lk, D,
    qk_scale, sm_scale,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < D

    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    mask_base = Mask + b * stride_mb + h * stride_mh

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        m = start_m + offs_m
        m_ok = m < Lq
        # q and dO loaded transposed (BLOCK_D, BLOCK_M): every product below is then a plain dot.
        qT = tl.load(q_base + m[None, :] * stride_qm + offs_d[:, None], mask=d_ok[:, None] & m_ok[None, :],
                     other=0.0)
        doT = tl.load(do_base + m[None, :] * stride_dom + offs_d[:, None], mask=d_ok[:, None] & m_ok[None, :],
                      other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            doT = doT.to(tl.float32)
        lse = tl.load(Lse + pid_bh * Lq + m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + pid_bh * Lq + m, mask=m_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale          # (BLOCK_N, BLOCK_M)
        if HAS_MASK:
            mk = tl.load(mask_base + m[None, :] * stride_mm + offs_n[:, None] * stride_mn,
                         mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            sT += mk * 1.4426950408889634
        pT = tl.exp2(sT - lse[None, :])            # lse = +inf on padded / fully masked rows: p = 0
        pT = tl.where(n_ok[:, None], pT, 0.0)
        dv += tl.dot(pT.to(doT.dtype), tl.trans(doT), input_precision=DOT_PRECISION)
        dpT = tl.dot(v, doT, input_precision=DOT_PRECISION)                   # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)

    dk *= sm_scale
    out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, _to_out(dk, DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + out_off, _to_out(dv, DV.dtype.element_ty, UPCAST), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta,
    DQ,                 # (B, H, Lq, D) output, contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, Lq, Lk, D,
    qk_scale, sm_scale,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D

    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < Lk
        kv_mask = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(v_base + n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            mk = tl.load(mask_base + offs_m[:, None] * stride_mm + n[None, :] * stride_mn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += mk * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             _to_out(dq, DQ.dtype.element_ty, UPCAST), mask=qd_mask)


# --------------------------------------------------------------------------------------------------------------
# Block sizes. Chosen from AOT compiles for sm_89 (see module doc): the largest tiles that neither spill nor
# exceed the shared-memory limit; 16-bit and fp32 inputs differ because fp32 tiles take twice the registers
# and shared memory. Every (kind, BLOCK_D, dtype) pair dispatch can launch is listed by ``configs()``.
# --------------------------------------------------------------------------------------------------------------

_BLOCK_DS = (16, 32, 64, 128, 256)
_KERNELS = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}

# (kind, BLOCK_D, fp32 inputs, has mask) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Generated by
# kernels/tune_aot.py: the first candidate (largest tile first) that compiles for sm_89 without register spills
# and within 99 KB of shared memory, for fp32 in both "ieee" and "tf32" dot precision. fp32 with head_dim > 128
# (BLOCK_D 256) has no entry: no candidate down to 16x16 tiles compiled without spills, so the triton backend
# declines it (MAX_HEAD_DIM_FP32) and dispatch picks another backend.
_CONFIGS = {
    ('fwd', 16, False, False): (128, 64, 4, 2),
    ('fwd', 16, False, True): (128, 64, 8, 2),
    ('fwd', 16, True, False): (128, 64, 8, 2),
    ('fwd', 16, True, True): (128, 32, 8, 2),
    ('fwd', 32, False, False): (128, 64, 4, 2),
    ('fwd', 32, False, True): (128, 64, 8, 2),
    ('fwd', 32, True, False): (128, 32, 4, 2),
    ('fwd', 32, True, True): (128, 32, 8, 2),
    ('fwd', 64, False, False): (128, 64, 4, 2),
    ('fwd', 64, False, True): (128, 32, 8, 2),
    ('fwd', 64, True, False): (32, 32, 4, 1),
    ('fwd', 64, True, True): (32, 32, 4, 1),
    ('fwd', 128, False, False): (128, 64, 8, 2),
    ('fwd', 128, False, True): (128, 32, 8, 2),
    ('fwd', 128, True, False): (64, 32, 8, 2),
    ('fwd', 128, True, True): (64, 32, 8, 2),
    ('fwd', 256, False, False): (64, 32, 8, 2),  # set by hand from the first AOT sweep; verified by tests/test_triton_aot.py
    ('fwd', 256, False, True): (64, 32, 8, 2),  # set by hand from the first AOT sweep; verified by tests/test_triton_aot.py
    ('bwd_dkdv', 16, False, False): (64, 128, 8, 2),
    ('bwd_dkdv', 16, False, True): (32, 128, 8, 2),
    ('bwd_dkdv', 16, True, False): (32, 64, 8, 1),
    ('bwd_dkdv', 16, True, True): (32, 64, 8, 1),
    ('bwd_dkdv', 32, False, False): (64, 128, 8, 2),
    ('bwd_dkdv', 32, False, True): (32, 128, 8, 2),
    ('bwd_dkdv', 32, True, False): (32, 64, 8, 1),
    ('bwd_dkdv', 32, True, True): (32, 64, 8, 1),
    ('bwd_dkdv', 64, False, False): (32, 64, 8, 1),
    ('bwd_dkdv', 64, False, True): (32, 64, 4, 2),
    ('bwd_dkdv', 64, True, False): (32, 32, 4, 1),
    ('bwd_dkdv', 64, True, True): (32, 32, 4, 1),
    ('bwd_dkdv', 128, False, False): (64, 64, 8, 1),
    ('bwd_dkdv', 128, False, True): (64, 64, 8, 1),
    ('bwd_dkdv', 128, True, False): (16, 16, 8, 1),
    ('bwd_dkdv', 128, True, True): (16, 32, 4, 1),
    ('bwd_dkdv', 256, False, False): (16, 32, 4, 1),
    ('bwd_dkdv', 256, False, True): (16, 32, 4, 1),  # set by hand from the first AOT sweep; verified by tests/test_triton_aot.py
    ('bwd_dq', 16, False, False): (128, 64, 8, 2),
    ('bwd_dq', 16, False, True): (128, 64, 8, 2),
    ('bwd_dq', 16, True, False): (64, 32, 8, 1),
    ('bwd_dq', 16, True, True): (64, 32, 8, 1),
    ('bwd_dq', 32, False, False): (128, 64, 8, 2),
    ('bwd_dq', 32, False, True): (128, 32, 8, 2),
    ('bwd_dq', 32, True, False): (64, 32, 8, 1),
    ('bwd_dq', 32, True, True): (64, 32, 8, 1),
    ('bwd_dq', 64, False, False): (128, 64, 8, 2),
    ('bwd_dq', 64, False, True): (64, 32, 4, 2),
    ('bwd_dq', 64, True, False): (64, 32, 8, 1),
    ('bwd_dq', 64, True, True): (64, 32, 8, 1),
    ('bwd_dq', 128, False, False): (64, 32, 8, 1),
    ('bwd_dq', 128, False, True): (128, 32, 8, 2),
    ('bwd_dq', 128, True, False): (16, 16, 4, 1),
    ('bwd_dq', 128, True, True): (16, 16, 4, 1),
    ('bwd_dq', 256, False, False): (32, 16, 4, 1),
    ('bwd_dq', 256, False, True): (32, 16, 4, 1),
}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def kernel_config(kind: str, head_dim: int, dtype: torch.dtype, has_mask: bool) -> dict:
    """Block sizes and launch options of one kernel ("fwd", "bwd_dkdv", "bwd_dq") for these inputs."""
    bd = _block_d(head_dim)
    bm, bn, warps, stages = _CONFIGS[(kind, bd, dtype == torch.float32, bool(has_mask))]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own TF32 switch for matmuls, so the kernel is as exact as torch's SDPA.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _tl_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def aot_entry(kind, dtype, block_d, has_mask, precision, block_m, block_n, num_warps, num_stages) -> dict:
    """One AOT-compilable configuration: kernel, triton signature, constexprs and launch options."""
    kernel = _KERNELS[kind]
    ty = _tl_dtype(dtype)
    constexprs = dict(HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=False,
                      DOT_PRECISION=precision)
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"):
            sig[name] = "*" + ty
        elif name in ("Mask", "Lse", "Delta"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    key = f"{ty} D<={block_d} mask={int(has_mask)}" + (f" {precision}" if dtype == torch.float32 else "")
    return dict(kernel=kernel, name=f"attn_{kind}", key=key + f" {block_m}x{block_n}", signature=sig,
                constexprs=constexprs, num_warps=num_warps, num_stages=num_stages)


def configs() -> list[dict]:
    """Every kernel configuration the launchers can pick (for the AOT test and the report)."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for block_d in _BLOCK_DS:
            if dtype == torch.float32 and block_d > MAX_HEAD_DIM_FP32:
                continue
            for has_mask in (False, True):
                for prec in precisions:
                    for kind in _KERNELS:
                        c = kernel_config(kind, block_d, dtype, has_mask)
                        out.append(aot_entry(kind, dtype, block_d, has_mask, prec, c["BLOCK_M"], c["BLOCK_N"],
                                             c["num_warps"], c["num_stages"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, attn_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash attention: {name} must be a 4-d tensor (B, heads, L, head_dim)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash attention: {name} has dtype {t.dtype}; supported: fp32, bf16, fp16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("flash attention: the Triton kernel runs CUDA tensors (CPU only under TRITON_INTERPRET=1)")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[2] != v.shape[2] or k.shape[3] != D \
            or v.shape[3] != D:
        raise ValueError(f"flash attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)")
    if D > MAX_HEAD_DIM or (q.dtype == torch.float32 and D > MAX_HEAD_DIM_FP32):
        raise ValueError(f"flash attention: head_dim {D} is not supported in {q.dtype} (at most {MAX_HEAD_DIM}, "
                         f"{MAX_HEAD_DIM_FP32} in fp32)")
    if attn_mask is not None:
        if attn_mask.device != q.device:
            raise ValueError(f"flash attention: attn_mask is on {attn_mask.device}, q on {q.device}")


_INT32_LIMIT = 2 ** 31


def _batch_chunks(B: int, H: int, tensors) -> list[tuple[int, int]]:
    """Ranges [b0, b1) of samples to launch together: every offset the kernels compute within a launch must fit
    int32, and B * H must fit grid axis y. ``tensors``: (name, tensor with the batch as dim 0) pairs."""
    per = max(1, MAX_GRID[1] // H)
    for name, t in tensors:
        if t is None:
            continue
        # the largest offset inside one sample: every other dim at its last index
        inner = sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) + 1
        if inner >= _INT32_LIMIT:
            raise ValueError(f"flash attention: one sample of {name} spans {inner} elements; the kernels' offsets "
                             "within a launch are int32 (below 2^31)")
        if t.stride(0) > 0:
            per = min(per, (_INT32_LIMIT - inner) // t.stride(0) + 1)
    return [(b0, min(B, b0 + per)) for b0 in range(0, B, per)]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels index the head dim with stride 1; any other stride pattern is passed through as is.
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep_mask(attn_mask, q, Lk):
    """fp32 additive mask with broadcast dims as stride 0 (never materialised to the full shape)."""
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    m = attn_mask
    if m.dtype == torch.bool:   # SDPA semantics: True = attend
        m = torch.where(m, 0.0, float("-inf")).to(torch.float32)
    else:
        m = m.to(torch.float32)
    B, H, Lq, _ = q.shape
    try:
        m = m.expand(B, H, Lq, Lk)
    except RuntimeError as exc:
        raise ValueError(f"flash attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(B, H, Lq, Lk) = {(B, H, Lq, Lk)}") from exc
    return m, tuple(m.stride())


def flash_attention_fwd(q, k, v, attn_mask=None, scale=None):
    """Forward: returns ``(out, lse)``; ``out`` (B, H, Lq, D) contiguous in q's dtype, ``lse`` (B*H, Lq) fp32."""
    _check_inputs(q, k, v, attn_mask)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Lk == 0:   # no keys at all: every row is "fully masked"
        return out.zero_(), lse.fill_(float("inf"))
    mask, ms = _prep_mask(attn_mask, q, Lk)
    cfg = kernel_config("fwd", D, q.dtype, mask is not None)
    lse3 = lse.view(B, H, Lq)
    with on_device(q):
        for b0, b1 in _batch_chunks(B, H, (("q", q), ("k", k), ("v", v), ("attn_mask", mask), ("out", out))):
            grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), (b1 - b0) * H)
            _attn_fwd_kernel[grid](
                q[b0:b1], k[b0:b1], v[b0:b1], mask[b0:b1] if mask is not None else lse, out[b0:b1], lse3[b0:b1],
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *out.stride()[:3],
                H, Lq, Lk, D, scale * _LOG2E,
                HAS_MASK=mask is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                UPCAST=interpreting(), DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def flash_attention_bwd(do, q, k, v, out, lse, attn_mask=None, scale=None):
    """Backward: returns ``(dq, dk, dv)`` for the forward that produced ``out`` and ``lse``."""
    _check_inputs(q, k, v, attn_mask)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=q.device)
    if q.numel() == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_i = sum_d dO_id O_id: one cheap pass, in fp32.
    delta = (do.float() * out.float()).sum(-1).reshape(B * H, Lq).contiguous()
    mask, ms = _prep_mask(attn_mask, q, Lk)
    mask_arg = mask if mask is not None else lse
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *do.stride()[:3])

    def opts(kind):
        c = kernel_config(kind, D, q.dtype, mask is not None)
        return c, dict(HAS_MASK=mask is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=c["BLOCK_D"],
                       UPCAST=interpreting(), DOT_PRECISION=_dot_precision(q.dtype),
                       num_warps=c["num_warps"], num_stages=c["num_stages"])

    lse3, delta3 = lse.view(B, H, Lq), delta.view(B, H, Lq)
    chunks = _batch_chunks(B, H, (("q", q), ("k", k), ("v", v), ("attn_mask", mask), ("grad", do), ("dq", dq),
                                  ("dk", dk), ("dv", dv)))
    with on_device(q):
        for b0, b1 in chunks:
            q_, k_, v_, do_ = q[b0:b1], k[b0:b1], v[b0:b1], do[b0:b1]
            mask_ = mask[b0:b1] if mask is not None else lse
            c, o = opts("bwd_dkdv")
            _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, c["BLOCK_N"]), (b1 - b0) * H)](
                q_, k_, v_, mask_, do_, lse3[b0:b1], delta3[b0:b1], dk[b0:b1], dv[b0:b1], *strides,
                *dk.stride()[:3], H, Lq, Lk, D, scale * _LOG2E, scale, **o)
            c, o = opts("bwd_dq")
            _attn_bwd_dq_kernel[(triton.cdiv(Lq, c["BLOCK_M"]), (b1 - b0) * H)](
                q_, k_, v_, mask_, do_, lse3[b0:b1], delta3[b0:b1], dq[b0:b1], *strides, *dq.stride()[:3],
                H, Lq, Lk, D, scale * _LOG2E, scale, **o)
    return dq, dk, dv

