"""Fused classifier-free guidance + sampler update in Triton (semantics: fastdiff/ops/sampler_step.py).

One pass over the latents, math in fp32::

    m   = u + g * (c - u)                 (CFG; u, c = the two halves of model_out along the batch)
    y   = clamp(px * x + pm * m, -clip, clip)
    out = a * y + b * x + s * noise

Memory-bound: reads x, model_out (1x or 2x the latents) and noise, writes out once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels._launch import check_grid, interpreting, on_device

__all__ = ["sampler_step_triton", "configs", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048
_NUM_WARPS = 4


@triton.jit
def _round_bf16(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): round by hand there.
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _sampler_step_kernel(
    X,          # latents x, contiguous, n elements
    M,          # model output: n elements, or 2n (uncond then cond) when HAS_CFG
    Noise,      # noise, n elements (unused unless HAS_NOISE)
    Out,        # output, n elements, dtype of x
    n,
    guidance, px, pm, clip, a, b, s,
    HAS_CFG: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    # int64 offsets: 2n can exceed 2^31 for large video latents.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(M + offs, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(M + n + offs, mask=ok, other=0.0).to(tl.float32)
        m = u + guidance * (c - u)
    else:
        m = tl.load(M + offs, mask=ok, other=0.0).to(tl.float32)
    y = px * x + pm * m
    if HAS_CLIP:
        y = tl.minimum(tl.maximum(y, -clip), clip)
    out = a * y + b * x
    if HAS_NOISE:
        out += s * tl.load(Noise + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + offs, _round_bf16(out, Out.dtype.element_ty, UPCAST), mask=ok)


def sampler_step_triton(x, model_out, a, b, s=0.0, noise=None, *, pred=(0.0, 1.0), clip=None, guidance_scale=None):
    """Launcher (same arguments as :func:`fastdiff.ops.sampler_step`, shapes already checked there)."""
    if x.dtype not in SUPPORTED_DTYPES or model_out.dtype != x.dtype or (noise is not None and noise.dtype != x.dtype):
        raise TypeError(f"sampler_step (triton): x, model_out, noise must share a dtype in fp32/bf16/fp16; got "
                        f"{x.dtype}, {model_out.dtype}" + (f", {noise.dtype}" if noise is not None else ""))
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("sampler_step (triton): CUDA tensors only (CPU only under TRITON_INTERPRET=1)")
    for name, t in (("model_out", model_out), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"sampler_step (triton): {name} is on {t.device}, x on {x.device}")
    want = (2 if guidance_scale is not None else 1) * x.numel()
    if model_out.numel() != want:
        raise ValueError(f"sampler_step (triton): model_out has {model_out.numel()} elements, expected {want}")
    x_c, m_c = x.contiguous(), model_out.contiguous()
    noise_c = noise.contiguous() if noise is not None else x_c
    out = torch.empty_like(x_c)
    n = x_c.numel()
    if n == 0:
        return out
    has_noise = noise is not None and s != 0.0
    with on_device(x_c):
        _sampler_step_kernel[check_grid((triton.cdiv(n, _BLOCK),), "sampler_step")](
            x_c, m_c, noise_c, out, n,
            float(guidance_scale or 0.0), float(pred[0]), float(pred[1]), float(clip or 0.0),
            float(a), float(b), float(s),
            HAS_CFG=guidance_scale is not None, HAS_NOISE=has_noise, HAS_CLIP=clip is not None,
            BLOCK=_BLOCK, UPCAST=interpreting(), num_warps=_NUM_WARPS)
    return out


def configs() -> list[dict]:
    """Every configuration the launcher can pick (dtype x flags), for the AOT test and the report."""
    out = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for cfg_ in (False, True):
            for noise in (False, True):
                for clip in (False, True):
                    sig = {"X": "*" + ty, "M": "*" + ty, "Noise": "*" + ty, "Out": "*" + ty, "n": "i32"}
                    for name in ("guidance", "px", "pm", "clip", "a", "b", "s"):
                        sig[name] = "fp32"
                    constexprs = dict(HAS_CFG=cfg_, HAS_NOISE=noise, HAS_CLIP=clip, BLOCK=_BLOCK, UPCAST=False)
                    sig.update({k: "constexpr" for k in constexprs})
                    out.append(dict(kernel=_sampler_step_kernel, name="sampler_step",
                                    key=f"{ty} cfg={int(cfg_)} noise={int(noise)} clip={int(clip)} B{_BLOCK}",
                                    signature=sig, constexprs=constexprs, num_warps=_NUM_WARPS, num_stages=1))
    return out
