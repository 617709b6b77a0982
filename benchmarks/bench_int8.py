"""The int8 (W8A8) path against fp32 and bf16 on SD1's layer shapes and on a whole SD1.5 UNet step, in one run.

Run: ``pytest benchmarks/bench_int8.py --benchmark-only -s`` (reduced size: SD1's layers at a 128x128 image, i.e.
16x16 latents, and the UNet step at 128x128); ``--full-size`` uses the 512x512 shapes (64x64 latents).

Rows (ratio = baseline time / int8 time; TFLOP/s counts 2 x multiply-adds, for int8 read it as TOP/s):

* layer rows: ``Int8Conv2d`` / ``Int8Linear`` (activation quantisation included: the min/max pass, the uint8
  conversion, oneDNN's int8 primitive, the fp32 output) against eager ``F.conv2d`` / ``F.linear`` in fp32, and
  against fastdiff's bf16 ``Conv2d`` / ``Linear`` (bf16 in and out; on CPUs without bf16 dot products that runs
  oneDNN's fp32 kernel and rounds once). Candidates measured and dropped: ``torch._int_mm`` on the CPU ran
  30-100x slower than the fp32 matmul (no oneDNN path; not a candidate), and fbgemm's ``torch.ops.quantized``
  ops need quantised tensors (deprecated in torch 2.14) and a static output scale, so they do not fit a dynamic
  float-output layer.
* the UNet row: one guided step (batch 2) of the full-size SD1.5 UNet (random weights) in int8 vs fp32, and the
  noise prediction's error against fp32 printed beside bf16's (relative RMS and max).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from conftest import FULL_SIZE, add_row, peak_memory_increase
from fastdiff.ops import Conv2d, Linear
from fastdiff.quant import int8 as q8

LATENT = 64 if FULL_SIZE else 16   # SD1's latent side at 512x512 (full) or 128x128 (default)

# SD1 convolutions: (channels in, channels out, kernel, latent side divisor)
CONVS = [(320, 320, 3, 1), (640, 640, 3, 2), (1280, 1280, 3, 4), (320, 640, 1, 2)]
# SD1 linears: (tokens per image, in, out): attention projections, GEGLU up, FFN down, cross-attention k/v
LINEARS = [((LATENT // 1) ** 2, 320, 320), ((LATENT // 1) ** 2, 320, 2560), ((LATENT // 1) ** 2, 1280, 320),
           ((LATENT // 2) ** 2, 640, 640), (77, 768, 320)]


def _case_conv(cin, cout, k, div):
    s = LATENT // div
    x = torch.randn(2, cin, s, s).contiguous(memory_format=torch.channels_last)
    conv = Conv2d(cin, cout, k, padding=k // 2).eval()
    return x, conv, 2 * 2 * cout * cin * k * k * s * s


@pytest.mark.parametrize("baseline", ["fp32", "bf16"])
@pytest.mark.parametrize("cin,cout,k,div", CONVS)
def test_int8_conv(compare, cin, cout, k, div, baseline):
    x, conv, flops = _case_conv(cin, cout, k, div)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    qconv = q8.Int8Conv2d(conv)
    case = f"{tuple(x.shape)} -> {cout} k{k}"
    with torch.no_grad():
        if baseline == "fp32":
            compare("int8 conv vs fp32 F.conv2d", case + " int8/fp32", lambda: qconv(x),
                    lambda: F.conv2d(x, w, b, padding=k // 2), flops=flops)
            return
        cb = Conv2d(cin, cout, k, padding=k // 2).eval()
        cb.load_state_dict({"weight": w, "bias": b})
        cb = cb.bfloat16()
        xb = x.bfloat16()
        compare("int8 conv vs bf16 fastdiff Conv2d", case + " bf16", lambda: qconv(xb), lambda: cb(xb), flops=flops)


@pytest.mark.parametrize("baseline", ["fp32", "bf16"])
@pytest.mark.parametrize("rows,cin,cout", LINEARS)
def test_int8_linear(compare, rows, cin, cout, baseline):
    x = torch.randn(2 * rows, cin)
    lin = Linear(cin, cout).eval()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    ql = q8.Int8Linear(lin)
    flops = 2 * 2 * rows * cin * cout
    case = f"({2 * rows}, {cin}) -> {cout}"
    with torch.no_grad():
        if baseline == "fp32":
            compare("int8 linear vs fp32 F.linear", case + " int8/fp32", lambda: ql(x), lambda: F.linear(x, w, b),
                    flops=flops)
            return
        lb = Linear(cin, cout).eval()
        lb.load_state_dict({"weight": w, "bias": b})
        lb = lb.bfloat16()
        xb = x.bfloat16()
        compare("int8 linear vs bf16 fastdiff Linear", case + " bf16", lambda: ql(xb), lambda: lb(xb), flops=flops)


def _err(a, b):
    d = (a.double() - b.double())
    return (float(d.pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()),
            float(d.abs().max() / b.double().abs().max()))


def test_int8_sd15_unet_step(benchmark):
    """One guided step of the full-size SD1.5 UNet (random weights): int8 vs fp32 time, and the noise
    prediction error of int8 and of bf16 against fp32."""
    from fastdiff.models import unet_sd

    torch.manual_seed(0)
    ref = unet_sd.UNetSD(unet_sd.SD15).eval()
    x = torch.randn(2, 4, LATENT, LATENT)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768)
    with torch.no_grad():
        t0 = time.perf_counter()
        y32 = ref(x, t, ctx)
        t32 = time.perf_counter() - t0
        bf = unet_sd.UNetSD(unet_sd.SD15).eval()
        bf.load_state_dict(ref.state_dict())
        bf = bf.bfloat16()
        y16 = bf(x.bfloat16(), t, ctx.bfloat16()).float()
        del bf
        q = unet_sd.UNetSD(unet_sd.SD15).eval()
        q.load_state_dict(ref.state_dict())
        q8.quantize_int8(q)
        yq = q(x, t, ctx)  # warm-up: packs the int8 weights
        box = {}

        def timed(fn, key):
            t0 = time.perf_counter()
            fn()
            box[key] = time.perf_counter() - t0

        t32b = peak_memory_increase(lambda: timed(lambda: ref(x, t, ctx), "fp32"))
        tq8 = peak_memory_increase(lambda: timed(lambda: q(x, t, ctx), "int8"))
    # 1.61 TFLOP for the guided 512x512 step (torch's FLOP counter on diffusers' UNet), scaled by the latent area
    # (an approximation at the reduced size: the attention's share grows faster than the area)
    flops = 1.61e12 * (LATENT / 64) ** 2
    r16, m16 = _err(y16, y32)
    rq, mq = _err(yq, y32)
    print(f"\nSD1.5 UNet step {LATENT * 8}x{LATENT * 8} (batch 2): fp32 {box['fp32']:.2f} s (first call {t32:.2f} s), "
          f"int8 {box['int8']:.2f} s; noise prediction vs fp32: relative RMS error bf16 {r16:.4f}, int8 {rq:.4f}; "
          f"relative max error bf16 {m16:.4f}, int8 {mq:.4f}")
    add_row(f"SD1.5 UNet step int8 vs fp32 (rel. RMS err int8 {rq:.3f}, bf16 {r16:.3f})",
            f"{LATENT * 8}x{LATENT * 8} batch 2", box["int8"], box["fp32"], baseline="fp32 fastdiff", dtype="int8",
            tflops=flops / box["int8"] / 1e12, peak_mb=tq8, peak_mb_base=t32b)
    benchmark.extra_info.update(int8_s=box["int8"], fp32_s=box["fp32"], rms_err_int8=rq, rms_err_bf16=r16,
                                max_err_int8=mq, max_err_bf16=m16)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
