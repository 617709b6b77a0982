"""Attention on CPU: fastdiff's chosen backend vs the eager sequence (matmul-softmax-matmul) and vs torch SDPA.

At the SD1 UNet's attention shapes (batch 2 for classifier-free guidance, 8 heads: 64x64 latent self-attention
d40, its cross-attention to 77 text tokens, 32x32 d80, 16x16 d160) and SD3's joint attention (24 heads,
1024 image + 154 text tokens, d64), fp32 and bf16. FLOPs: 4 * B * H * Lq * Lk * D forward (two matmuls),
2.5x that for the backward. Run: ``pytest benchmarks/bench_attention.py --benchmark-only -s``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import attention
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


def eager(q, k, v, scale):
    """What an attention written in eager PyTorch does (diffusers' classic AttnProcessor)."""
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)


def _say(what):
    r = conftest._ROWS[-1]   # the row compare() just recorded (same run)
    fl = r["tflops"] * 1e12 * r["fast"]   # FLOPs of one call
    print(f"\n{what}: fastdiff {r['fast'] * 1e3:.1f} ms ({r['tflops'] * 1e3:.0f} GFLOP/s), baseline "
          f"{r['eager'] * 1e3:.1f} ms ({fl / r['eager'] / 1e9:.0f} GFLOP/s)")


def _inputs(B, H, Lq, Lk, D, dtype, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_(grad) for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_vs_eager(compare, shape, dtype):
    name, B, H, Lq, Lk, D = shape
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype)
    backend = all_ops()["attention"].select(q, k, v, None, None)
    flops = 4 * B * H * Lq * Lk * D
    ratio = compare(f"attention fwd [{backend}] vs eager", f"{name} {str(dtype)[6:]}", lambda: attention(q, k, v),
                    lambda: eager(q, k, v, D ** -0.5), flops=flops)
    _say(f"attention {name} {dtype}: {ratio:.2f}x eager")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_vs_sdpa(compare, shape, dtype):
    name, B, H, Lq, Lk, D = shape
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype)
    backend = all_ops()["attention"].select(q, k, v, None, None)
    flops = 4 * B * H * Lq * Lk * D
    ratio = compare(f"attention fwd [{backend}] vs SDPA", f"{name} {str(dtype)[6:]}", lambda: attention(q, k, v),
                    lambda: F.scaled_dot_product_attention(q, k, v), flops=flops)
    _say(f"attention {name} {dtype}: {ratio:.2f}x SDPA in the input dtype")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=[SHAPES[2][0], SHAPES[4][0]])
def test_attention_fwd_bwd_vs_eager(compare, shape, dtype):
    name, B, H, Lq, Lk, D = shape
    q, k, v = _inputs(B, H, Lq, Lk, D, dtype, grad=True)
    do = torch.randn(B, H, Lq, D).to(dtype)
    backend = all_ops()["attention"].select(q, k, v, None, None)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), do)

    flops = 3.5 * 4 * B * H * Lq * Lk * D
    ratio = compare(f"attention fwd+bwd [{backend}] vs eager", f"{name} {str(dtype)[6:]}",
                    step(lambda: attention(q, k, v)), step(lambda: eager(q, k, v, D ** -0.5)), flops=flops)
    _say(f"attention fwd+bwd {name} {dtype}: {ratio:.2f}x eager")
