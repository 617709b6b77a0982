"""Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, in the layout of SDPA.

``attention(q, k, v, attn_mask=None, scale=None)`` is a drop-in for ``F.scaled_dot_product_attention`` without
dropout and causal flags: q (B, heads, Lq, head_dim), k and v (B, heads, Lk, head_dim); self-attention
(Lq == Lk) and cross-attention (SD1: Lk = 77 text tokens), head dims of SD1 (40, 80, 160) and SD3 (64).
``attn_mask`` broadcasts to (B, heads, Lq, Lk): bool (True = attend) or float (added to the scores).
``scale`` defaults to ``1/sqrt(head_dim)``.

Documented results on edge cases (every backend): a query row whose keys are all masked out gets output 0 and
zero gradients (torch's CPU SDPA does the same); Lk = 0 gives zeros; NaN in the inputs propagates to the rows
it touches.

Backends:
- ``ref``: explicit ``softmax(q k^T * scale) v`` with fp32 math: the oracle.
- ``cpu``: fastdiff's own flash-attention kernel (csrc/cpu/attention_impl.h: forward and backward, fp32 and bf16,
  fp32 online softmax, no Lq x Lk matrix, AVX2 / AVX-512 / AVX512-BF16 variants chosen at run time), where
  benchmarks/bench_attention.py measured it faster than torch's SDPA; torch's SDPA (its fused CPU flash kernel)
  elsewhere, see :func:`kernel_loses`. :func:`cpu_flash_attention` runs the kernel itself.
- ``triton``: fastdiff's flash-attention forward and backward kernels (kernels/flash_attention.py).
- ``cuda``: torch's SDPA on CUDA tensors (its flash / memory-efficient kernels never hold the score matrix), for
  inputs triton cannot run (triton missing, fp32 head dims above 128, ...); automatic choice prefers triton.
- ``flash_attn``: the flash-attn package on a CUDA device, when it is installed (optional, never a dependency).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops._backends import tensor_reasons
from fastdiff.ops._onednn import bf16_math_dtype
from fastdiff.ops.registry import Op
from fastdiff.ops.routing import current_route, sdpa_reason, train_ref_reason

__all__ = ["attention", "attention_ref", "cpu_flash_attention", "kernel_loses"]

_op = Op("attention")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# Input checks (public boundary) and the reference
# ----------------------------------------------------------------------------------------------------------

def _check(q, k, v, attn_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-d (B, heads, L, head_dim); got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    devs = {q.device, k.device, v.device} | ({attn_mask.device} if isinstance(attn_mask, torch.Tensor) else set())
    if len(devs) > 1:
        raise ValueError(f"attention: inputs are on different devices: {', '.join(sorted(map(str, devs)))}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[3] != D \
            or k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: expected q (B, H, Lq, D), k and v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D == 0:
        raise ValueError("attention: head_dim must be positive")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attention: attn_mask must be bool (True = attend) or floating (added to the "
                            f"scores); got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, H, Lq, Lk) = {(B, H, Lq, k.shape[2])}") from None
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a number or None, got {type(scale).__name__}")


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention_ref(q, k, v, attn_mask=None, scale=None):
    """Pure-PyTorch reference: explicit ``softmax(q k^T * scale + mask) v`` in fp32, output in q's dtype."""
    dtype = q.dtype
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * _scale(q, scale)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    if s.shape[-1] == 0:
        return torch.zeros(q.shape, dtype=dtype, device=q.device) + 0 * q.sum()  # keeps the graph for autograd
    # A row with every key masked has max -inf: its softmax is NaN; define it as 0 (see module doc).
    empty = torch.isneginf(s.amax(-1, keepdim=True))
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, v.float()).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# cpu: fastdiff's flash-attention kernel (csrc/cpu/attention*), and torch SDPA where the kernel loses
# ----------------------------------------------------------------------------------------------------------

def _kernel_mask(attn_mask, B, H, Lq, Lk):
    """The mask as the kernel reads it: fp32, 4-d (B|1, H|1, Lq, Lk) with unit stride along Lk (broadcast dims
    keep stride 0: no copy of a padding mask), bool turned into 0 / -inf."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    elif m.dtype != torch.float32:
        m = m.float()
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    m = m.expand(m.shape[0], m.shape[1], Lq, Lk)
    if m.stride(-1) != 1:   # broadcast along the keys: materialise (rare; a per-row constant)
        m = m.contiguous()
    return m


def _mask_not_finite(attn_mask) -> bool:
    """NaN or +inf in a float mask: the kernel clamps scores, so such masks go to the reference (NaN propagates)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return False
    return bool(torch.isnan(attn_mask).any() or torch.isposinf(attn_mask).any())


if _ext.has_cpu_kernels():

    @torch.library.register_fake("fastdiff::attention")
    def _attention_fake(q, k, v, attn_mask, scale, pair_dot):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastdiff::attention_backward")
    def _attention_backward_fake(grad, q, k, v, out, lse, attn_mask, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup(ctx, inputs, output):
        q, k, v, mask, scale, _pair_dot = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse, mask)

    def _backward(ctx, grad, _glse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastdiff.attention_backward(grad, q, k, v, out, lse, mask, ctx.scale)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("fastdiff::attention", _backward, setup_context=_setup)


def cpu_flash_attention(q, k, v, attn_mask=None, scale=None, *, pair_dot: int = 0):
    """fastdiff's CPU flash-attention kernel itself (what the ``cpu`` backend runs where it wins; tests and
    benchmarks call it directly). ``pair_dot``: 0 = bf16 pair dot products (``vdpbf16ps``) where the CPU has
    AVX512-BF16, 1 = fp32 products always, 2 = pair products for bf16 inputs on any CPU (emulated without
    AVX512-BF16: the tests of that path's logic). Inputs must be finite (the ``cpu`` backend checks)."""
    B, H, Lq, _ = q.shape
    m = _kernel_mask(attn_mask, B, H, Lq, k.shape[2])
    return torch.ops.fastdiff.attention(q, k, v, m, _scale(q, scale), pair_dot)[0]


def _sdpa_bf16_upcast(q, k, v) -> bool:
    """Whether a bf16 attention sent to torch SDPA runs faster upcast to fp32 (compute, round once).

    The inference threshold is the routing row's ``sdpa_bf16_upcast_min_scores`` (the measurements are there).
    The upcast is also more exact (fp32 softmax and accumulation; one rounding at the end).
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # training: the bf16 backward is the slow part (upcast fwd+bwd 0.50-0.61 of the bf16 SDPA time, 1 thread,
        # Zen 5), unless this CPU has fast bf16 dot products or FASTDIFF_CPU_BF16_MATH=native asks for the native
        # kernels (fastdiff.ops._onednn)
        return bf16_math_dtype() == torch.float32
    n = current_route().sdpa_bf16_upcast_min_scores
    return n is not None and q.shape[-2] * k.shape[-2] >= n


def _sdpa(q, k, v, attn_mask, scale):
    if q.dtype == torch.bfloat16 and _sdpa_bf16_upcast(q, k, v):
        m = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
        # autocast off: under bf16 autocast SDPA would cast the fp32 operands straight back to bf16 (measured
        # 10x slower in training on an AVX2-only CPU, benchmarks/bench_train_ops.py::test_attention_train)
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                                  scale=_scale(q, scale)).to(q.dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)   # SDPA wants a float mask in the query's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=_scale(q, scale))


def kernel_loses(q, k, v, attn_mask=None, scale=None) -> str | None:
    """Why the ``cpu`` backend runs torch SDPA instead of fastdiff's kernel for this input (None: the kernel runs).

    The ``cpu`` backend holds both: the kernel where benchmarks/bench_attention.py measured it faster than SDPA,
    SDPA elsewhere (skipping the whole backend would fall to the ``ref`` oracle, far slower than either).
    """
    if not _ext.has_cpu_kernels():
        return f"the compiled extension fastdiff._C did not import ({_ext.IMPORT_ERROR})"
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad: the kernel computes no mask gradient"
    return sdpa_reason(q, k, v)


def _cpu_attention(q, k, v, attn_mask=None, scale=None):
    # Non-finite inputs go to the reference, where NaN propagates as documented (torch's CPU flash kernel turns a
    # query row that meets a NaN into zeros, and fastdiff's kernel clamps scores). A NaN or inf anywhere makes a
    # sum non-finite, so three O(L * D) sums (no boolean temporaries) and one host sync detect it: negligible next
    # to the O(Lq * Lk * D) attention. (A finite sum that overflows only sends a valid input to the reference:
    # slower, still right.)
    if not bool(torch.isfinite(q.sum(dtype=torch.float32) + k.sum(dtype=torch.float32)
                                + v.sum(dtype=torch.float32))) or _mask_not_finite(attn_mask):
        return attention_ref(q, k, v, attn_mask, scale)
    if kernel_loses(q, k, v, attn_mask, scale) is None:
        return cpu_flash_attention(q, k, v, attn_mask, scale)
    return _sdpa(q, k, v, attn_mask, scale)


def _mask_device(q, attn_mask):
    if attn_mask is not None and attn_mask.device != q.device:
        return [f"attn_mask is on {attn_mask.device}, q on {q.device}"]
    return []


def _cpu_reasons(q, k, v, attn_mask=None, scale=None):
    # fp16 on x86 CPUs runs at ~2 GFLOP/s (torch matmul): leave it to the reference rather than pretend.
    return tensor_reasons("cpu", q, k, v, dtypes=(torch.float32, torch.bfloat16)) + _mask_device(q, attn_mask)


# ----------------------------------------------------------------------------------------------------------
# triton: fastdiff's flash attention (forward and backward)
# ----------------------------------------------------------------------------------------------------------

class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale):
        from fastdiff.kernels.flash_attention import flash_attention_fwd

        out, lse = flash_attention_fwd(q, k, v, attn_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        from fastdiff.kernels.flash_attention import flash_attention_bwd

        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, out, lse, attn_mask, ctx.scale)
        return dq, dk, dv, None, None


def _triton_attention(q, k, v, attn_mask=None, scale=None):
    return _TritonAttention.apply(q, k, v, attn_mask, _scale(q, scale))


def _triton_reasons(q, k, v, attn_mask=None, scale=None):
    out = tensor_reasons("triton", q, k, v, dtypes=_FLOAT_DTYPES) + _mask_device(q, attn_mask)
    if q.shape[-1] > 256:
        out.append(f"head_dim {q.shape[-1]} > 256 (the largest tile the kernels are compiled for)")
    elif q.dtype == torch.float32 and q.shape[-1] > 128:
        out.append(f"head_dim {q.shape[-1]} > 128 in fp32: no tile compiles without register spills on sm_89 "
                   "(use bf16/fp16)")
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        out.append("attn_mask requires grad: the kernel does not compute a mask gradient")
    return out


# ----------------------------------------------------------------------------------------------------------
# cuda: torch SDPA on the GPU (needs no fastdiff._C), where triton cannot run the input
# ----------------------------------------------------------------------------------------------------------

def _cuda_sdpa_attention(q, k, v, attn_mask=None, scale=None):
    # Fully masked rows must give 0 (module doc), but SDPA's memory-efficient CUDA kernel can give NaN there. Such
    # rows attend to every key inside SDPA instead (finite values, and no NaN in its backward) and are zeroed
    # after it, which also zeroes their gradient.
    empty = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1, keepdim=True)
            attn_mask = attn_mask | empty
        else:
            empty = torch.isneginf(attn_mask).all(-1, keepdim=True)
            attn_mask = attn_mask.masked_fill(empty, 0.0).to(q.dtype)   # SDPA wants a float mask in q's dtype
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=_scale(q, scale))
    return out if empty is None else out.masked_fill(empty, 0.0)


def _cuda_device_check():
    return [] if torch.cuda.is_available() else ["no CUDA device is visible to torch"]


def _cuda_sdpa_reasons(q, k, v, attn_mask=None, scale=None):
    return tensor_reasons("cuda", q, k, v, dtypes=_FLOAT_DTYPES) + _mask_device(q, attn_mask)


def _cuda_sdpa_after_triton(q, k, v, attn_mask=None, scale=None):
    if not _op.reasons("triton", q, k, v, attn_mask, scale):
        return ("fastdiff's triton flash attention runs this input and goes first (torch SDPA on CUDA is the "
                "fallback; the two have not been timed against each other on a GPU)")
    return None


# ----------------------------------------------------------------------------------------------------------
# flash_attn: the optional flash-attn package (CUDA, fp16/bf16, no arbitrary mask)
# ----------------------------------------------------------------------------------------------------------

def _flash_attn_attention(q, k, v, attn_mask=None, scale=None):
    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
    # flash-attn takes (B, L, H, D); its autograd gives the backward.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=_scale(q, scale))
    return out.transpose(1, 2)


def _flash_attn_reasons(q, k, v, attn_mask=None, scale=None):
    out = tensor_reasons("flash_attn", q, k, v, dtypes=(torch.bfloat16, torch.float16))
    if attn_mask is not None:
        out.append("flash-attn takes no arbitrary attn_mask")
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        out.append(f"head_dim {q.shape[-1]}: flash-attn needs a multiple of 8, at most 256")
    return out


def _cpu_slower(q, k, v, attn_mask=None, scale=None):
    # training: the routing row's train_ref (benchmarks/bench_train_ops.py::test_attention_train)
    return train_ref_reason("attention", q, k, v)


_op.register("ref")(attention_ref)
_op.register("cpu", _cpu_reasons, needs_backend=False, slower=_cpu_slower)(_cpu_attention)  # SDPA without fastdiff._C
_op.register("triton", _triton_reasons)(_triton_attention)
_op.register("cuda", _cuda_sdpa_reasons, needs_backend=False, slower=_cuda_sdpa_after_triton,
             check=_cuda_device_check)(_cuda_sdpa_attention)
_op.register("flash_attn", _flash_attn_reasons)(_flash_attn_attention)


def attention(q, k, v, attn_mask=None, scale=None):
    """``softmax(q k^T * scale + attn_mask) v`` for q (B, H, Lq, D), k and v (B, H, Lk, D); see module doc."""
    _check(q, k, v, attn_mask, scale)
    if k.shape[2] == 0 or q.numel() == 0:
        return attention_ref(q, k, v, attn_mask, scale)
    return _op(q, k, v, attn_mask, scale)
