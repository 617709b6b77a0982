"""A LoRA'd SD1.5 UNet step against the base step, same weights, same run: the cost of the unfused side path
(rank 32 on every attention projection: to_q, to_k, to_v, to_out.0 of attn1 and attn2, 128 layers) and of the
fused LoRA (which should equal the base).

Run: ``pytest benchmarks/bench_lora.py --benchmark-only -s``. By default the full-size UNet runs at 128x128
(16x16 latents), batch 2 (cond + uncond), one warm-up call and two interleaved rounds of each side (three with ``--full-size``), best of
each; ``--full-size`` adds 512x512. The LoRA'd model shares the base model's weight tensors (built on the meta
device and assigned), so the base side is timed on exactly the weights the LoRA sits on. The summary row's
ratio is base time / LoRA'd time (>= 0.91 means the unfused LoRA costs at most 1.10x the base step).
"""
from __future__ import annotations

import time

import pytest
import torch

from conftest import FULL_SIZE, add_row, time_once

RES = [128, 512] if FULL_SIZE else [128]
ROUNDS = 3 if FULL_SIZE else 2
RANK = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")


@pytest.fixture(scope="module")
def base_unet():
    from fastdiff.models import unet_sd

    torch.manual_seed(0)
    return unet_sd.UNetSD(unet_sd.SD15).eval()


def _lora_copy(base: torch.nn.Module, dtype: torch.dtype):
    """A second UNet on the same weight tensors, with a random rank-32 LoRA on every attention projection."""
    from fastdiff.adapters import LoraSet
    from fastdiff.models import unet_sd

    with torch.device("meta"):
        m = unet_sd.UNetSD(unet_sd.SD15)
    m.load_state_dict(base.state_dict(), assign=True)
    m.eval()
    g = torch.Generator().manual_seed(1)
    sd = {}
    for n, layer in m.named_modules():
        if n.endswith(_ATTN):
            sd[f"unet.{n}.lora_A.weight"] = (torch.randn(RANK, layer.in_features, generator=g) * 0.02).to(dtype)
            sd[f"unet.{n}.lora_B.weight"] = (torch.randn(layer.out_features, RANK, generator=g) * 0.02).to(dtype)
    loras = LoraSet({"unet": m})
    loras.load(sd, name="bench")
    return m, loras, len(sd) // 2



@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("res", RES)
def test_lora_unet_step(benchmark, base_unet, res, dname):
    dt = DTYPES[dname]
    base = base_unet.to(dt)
    lora_unet, loras, layers = _lora_copy(base, dt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, res // 8, res // 8, generator=g).to(dt)
    c = torch.randn(2, 77, 768, generator=g).to(dt)
    t = torch.tensor([500, 500])
    times = {"base": [], "unfused": [], "fused": []}
    with torch.inference_mode():
        run_base = lambda: base(x, t, c)  # noqa: E731
        run_lora = lambda: lora_unet(x, t, c)  # noqa: E731
        # the LoRA must change the output (or the timing would measure nothing)
        assert not torch.equal(run_base(), run_lora())
        for r in range(ROUNDS + 1):  # round 0 warms each side up
            times_r = {"base": time_once(run_base), "unfused": time_once(run_lora)}
            loras.fuse()
            times_r["fused"] = time_once(run_lora)
            loras.unfuse()
            if r:
                for k, v in times_r.items():
                    times[k].append(v)
    tb, tu, tf = (min(times[k]) for k in ("base", "unfused", "fused"))
    case = f"{res}px b2 r{RANK} x{layers} {dname}"
    add_row("SD1 UNet step + LoRA unfused vs base step", case, tu, tb, baseline="base step")
    add_row("SD1 UNet step + LoRA fused vs base step", case, tf, tb, baseline="base step")
    benchmark.extra_info.update(case=case, base_s=tb, lora_unfused_s=tu, lora_fused_s=tf,
                                unfused_cost=tu / tb, fused_cost=tf / tb)
    print(f"\nSD1 UNet step {case}: base {tb:.3f} s, LoRA unfused {tu:.3f} s ({tu / tb:.3f}x the base), "
          f"fused {tf:.3f} s ({tf / tb:.3f}x)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    loras.unload()
    base_unet.float()
