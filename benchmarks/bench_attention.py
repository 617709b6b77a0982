"""Attention on the CPU: fastdiff vs torch's ``F.scaled_dot_product_attention`` (its fused CPU flash kernel) in the
same run, forward and forward + backward, fp32 and bf16.

Shapes of the SD1 UNet at 512x512 (batch 2 for classifier-free guidance, 8 heads: 64x64 latent self-attention
d40, its cross-attention to 77 text tokens, 32x32 d80, 16x16 d160) and SD3's joint attention (24 heads, 1024 image
+ 154 text tokens, d64). Two rows per case: ``[auto: backend]`` is what ``fastdiff.ops.attention`` chooses for
the input (the registry's routing), ``[cpu kernel]`` runs fastdiff's own C++ flash-attention kernel
(``cpu_flash_attention``), so its numbers are in the table even where the routing passes it over. FLOPs: 4 * B * H * Lq * Lk * D forward (two
matmuls), 2.5x that for the backward (five); the summary gives TFLOP/s, and ``-s`` prints GFLOP/s and the fraction
of the machine's fp32 matmul ceiling measured in the same run (``matmul (compute ceiling)`` row).

The eager matmul-softmax-matmul (diffusers' classic AttnProcessor) is timed at the 32x32 shape only: at 64x64 it
materialises a 1 GB score tensor and takes seconds a call.

Run: ``pytest benchmarks/bench_attention.py --benchmark-only -s``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops import attention
from fastdiff.ops.attention import cpu_flash_attention
from fastdiff.ops.registry import all_ops

import conftest

# name, B, H, Lq, Lk, D
SHAPES = [
    ("sd1-64x64-self", 2, 8, 4096, 4096, 40),
    ("sd1-64x64-cross", 2, 8, 4096, 77, 40),
    ("sd1-32x32-self", 2, 8, 1024, 1024, 80),
    ("sd1-16x16-self", 2, 8, 256, 256, 160),
    ("sd3-joint", 2, 24, 1178, 1178, 64),
]
DTYPES = [torch.float32, torch.bfloat16]
OP = all_ops()["attention"]


def eager(q, k, v, scale):
    """What an attention written in eager PyTorch does (diffusers' classic AttnProcessor)."""
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)


def _inputs(B, H, Lq, Lk, D, dtype, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_(grad) for L in (Lq, Lk, Lk)]


def _skip_without_kernel():
    if not _ext.has_cpu_kernels():
        pytest.skip(f"fastdiff._C did not import ({_ext.IMPORT_ERROR}): no cpu kernel to time")


def _say(what, peak_gflops):
    r = conftest._ROWS[-1]   # the row compare() just recorded (same run)
    fl = r["tflops"] * 1e12 * r["fast"]   # FLOPs of one call
    gf, gb = fl / r["fast"] / 1e9, fl / r["eager"] / 1e9
    print(f"\n{what}: fastdiff {r['fast'] * 1e3:.1f} ms ({gf:.0f} GFLOP/s, {100 * gf / peak_gflops:.0f}% of the fp32 "
          f"matmul peak {peak_gflops:.0f}), {r['baseline']} {r['eager'] * 1e3:.1f} ms ({gb:.0f} GFLOP/s, "
          f"{100 * gb / peak_gflops:.0f}%): {r['eager'] / r['fast']:.2f}x")


def _side(which: str, q, k, v):
    """fastdiff's side of a case: the automatic choice (label names the backend) or the CPU kernel itself."""
    if which == "auto":
        return f"auto: {OP.select(q, k, v, None, None)}", lambda: attention(q, k, v)
    _skip_without_kernel()
    return "cpu kernel", lambda: cpu_flash_attention(q, k, v)


@pytest.mark.parametrize("which", ["auto", "cpu kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_fwd_vs_sdpa(compare, matmul_peak, shape, dtype, which):
    name, B, H, Lq, Lk, D = shape
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype)
    label, fast = _side(which, q, k, v)
    flops = 4 * B * H * Lq * Lk * D
    with torch.no_grad():
        compare(f"attention fwd [{label}] vs SDPA", f"{name} B{B} H{H} {Lq}x{Lk} d{D} {str(dtype)[6:]}", fast,
                lambda: F.scaled_dot_product_attention(q, k, v), flops=flops)
    _say(f"attention fwd {name} {dtype} [{label}]", matmul_peak)


@pytest.mark.parametrize("which", ["auto", "cpu kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=[SHAPES[0][0], SHAPES[1][0], SHAPES[4][0]])
def test_attention_fwd_bwd_vs_sdpa(compare, matmul_peak, shape, dtype, which):
    name, B, H, Lq, Lk, D = shape
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype, grad=True)
    do = torch.randn(B, H, Lq, D).to(dtype)
    label, ours = _side(which, q, k, v)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), do)

    flops = 3.5 * 4 * B * H * Lq * Lk * D
    compare(f"attention fwd+bwd [{label}] vs SDPA", f"{name} B{B} H{H} {Lq}x{Lk} d{D} {str(dtype)[6:]}", step(ours),
            step(lambda: F.scaled_dot_product_attention(q, k, v)), flops=flops)
    _say(f"attention fwd+bwd {name} {dtype} [{label}]", matmul_peak)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_attention_fwd_vs_eager(compare, matmul_peak, dtype):
    name, B, H, Lq, Lk, D = SHAPES[2]
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype)
    label = OP.select(q, k, v, None, None)
    flops = 4 * B * H * Lq * Lk * D
    with torch.no_grad():
        compare(f"attention fwd [auto: {label}] vs eager", f"{name} B{B} H{H} {Lq}x{Lk} d{D} {str(dtype)[6:]}",
                lambda: attention(q, k, v), lambda: eager(q, k, v, D ** -0.5), flops=flops)
    _say(f"attention fwd {name} {dtype} vs eager", matmul_peak)
