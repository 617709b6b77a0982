"""A ControlNet'd SD1.5 UNet step against the plain step and against diffusers, same random weights, same run.

One classifier-free-guided step (batch 2, 77-token context) of the full-size SD1.5 UNet with a full-size SD1.5
ControlNet (``fastdiff.models.controlnet``: the UNet's encoder copy, the 16-32-96-256 hint encoder, 13 zero
convolutions) feeding its 12 down residuals and its mid residual, timed beside

- the base step (the same UNet, no ControlNet): the ControlNet's cost, target <= 1.45x the base step;
- diffusers' ``ControlNetModel`` + ``UNet2DConditionModel`` on the same tensors (the step of
  ``StableDiffusionControlNetPipeline``).

Run: ``pytest benchmarks/bench_controlnet.py --benchmark-only -s``. By default the full-size models run at 128x128
(16x16 latents), one warm-up call and two interleaved rounds of each side, best of each; ``--full-size`` runs
512x512. fp32 and bf16; diffusers' bf16 side runs only where oneDNN has bf16 kernels (without bf16 dot products
torch's bf16 convolutions crawl at ~1 GFLOP/s: minutes per call). fastdiff's models are built on the meta device
and take diffusers' tensors (``assign=True``), so both libraries read the same weights and memory holds one copy.
The zero convolutions are re-drawn small (at zero the residuals would be zeros). Rows: ``ratio`` = baseline time /
ControlNet'd step time (>= 0.69 meets the 1.45x target against the base step).
"""
from __future__ import annotations

import time

import pytest
import torch

from conftest import FULL_SIZE, add_row, time_once

diffusers = pytest.importorskip("diffusers")

RES = [512] if FULL_SIZE else [128]
ROUNDS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def reference():
    from fastdiff.models import unet_sd

    torch.manual_seed(0)
    # SD1.5's config.json (tests/test_sd1_models.py checks that fastdiff's SD15 preset round-trips to it)
    unet = diffusers.UNet2DConditionModel.from_config(unet_sd.SD15.to_diffusers()).eval()
    cn = diffusers.ControlNetModel.from_unet(unet).eval()  # SD1.5's hint encoder widths (16, 32, 96, 256)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        zero = [cn.controlnet_cond_embedding.conv_out, cn.controlnet_mid_block, *cn.controlnet_down_blocks]
        for m in zero:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    return unet, cn


def _fastdiff_models(ref_unet, ref_cn):
    """fastdiff's UNet and ControlNet on diffusers' tensors (same storage)."""
    from fastdiff.models import controlnet, unet_sd

    with torch.device("meta"):
        unet = unet_sd.UNetSD(unet_sd.SD15)
        cn = controlnet.ControlNet(controlnet.SD15)
    unet.load_state_dict(ref_unet.state_dict(), assign=True)
    cn.load_state_dict(ref_cn.state_dict(), assign=True)
    return unet.eval(), cn.eval()



@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("res", RES)
def test_controlnet_unet_step(benchmark, reference, res, dname):
    from fastdiff.models.controlnet import controlled_unet
    from fastdiff.ops._onednn import onednn_has_bf16

    dt = DTYPES[dname]
    ref_unet, ref_cn = (m.to(dt) for m in reference)
    unet, cn = _fastdiff_models(ref_unet, ref_cn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, res // 8, res // 8, generator=g).to(dt)
    c = torch.randn(2, 77, 768, generator=g).to(dt)
    hint = torch.rand(1, 3, res, res, generator=g).to(dt)  # one control image for both halves of the batch
    t = torch.tensor([500, 500])
    with_diffusers = dt == torch.float32 or onednn_has_bf16()

    def run_diffusers():
        down, mid = ref_cn(x, t, c, controlnet_cond=hint.expand(2, -1, -1, -1), conditioning_scale=1.0,
                           return_dict=False)
        return ref_unet(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    sides = {"base": lambda: unet(x, t, c), "controlnet": lambda: controlled_unet(unet, x, t, c, [(cn, hint, 1.0)])}
    if with_diffusers:
        sides["diffusers"] = run_diffusers
    with torch.inference_mode():
        ours = sides["controlnet"]()
        # the ControlNet must change the output, and fastdiff's step must be diffusers' step
        assert not torch.equal(ours, sides["base"]())
        if dt == torch.float32:
            want = run_diffusers()
            err = (ours - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-3, f"fastdiff's ControlNet'd step differs from diffusers' by {err:.3g} (relative)"
        times = {k: [] for k in sides}
        for r in range(ROUNDS + 1):  # round 0 warms each side up
            for k, fn in sides.items():
                s = time_once(fn)
                if r:
                    times[k].append(s)
    best = {k: min(v) for k, v in times.items()}
    case = f"{res}px b2 {dname}"
    tc, tb = best["controlnet"], best["base"]
    add_row("SD1 UNet step + ControlNet vs base step", case, tc, tb, baseline="base step")
    msg = f"\nSD1 UNet step + ControlNet {case}: {tc:.3f} s, base step {tb:.3f} s ({tc / tb:.3f}x the base)"
    if with_diffusers:
        td = best["diffusers"]
        add_row("SD1 UNet step + ControlNet vs diffusers", case, tc, td, baseline="diffusers ControlNetModel + UNet")
        msg += f", diffusers {td:.3f} s (ratio {td / tc:.3f})"
    else:
        msg += ", diffusers skipped (no oneDNN bf16 kernels on this CPU)"
    benchmark.extra_info.update(case=case, controlnet_s=tc, base_s=tb, cost_vs_base=tc / tb,
                                **({"diffusers_s": best["diffusers"]} if with_diffusers else {}))
    print(msg)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for m in reference:
        m.float()
