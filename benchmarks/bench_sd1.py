"""Stable Diffusion 1.5 on the CPU: fastdiff vs diffusers on the same random full-size weights, same dtype and
threads, in one run.

Run: ``pytest benchmarks/bench_sd1.py --benchmark-only -s``. By default the full-size models run at a reduced
image size (128x128: the UNet step, the VAE decode and a 4-step txt2img), one timed round after one warm-up call
of each side; ``--full-size`` runs the UNet step at 256x256 and 512x512, the VAE decode at 512x512 and the
20-step 512x512 txt2img, with two rounds (tens of minutes on a 2-core CPU). Each case times the two sides
interleaved and reports the ratio, TFLOP/s of the UNet (2 x multiply-adds, counted by torch's FLOP counter on the
diffusers model) and the peak increase of malloc's in-use bytes during the timed calls (sampled every 5 ms: a CPU
stand-in for torch.cuda.max_memory_allocated)."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import FULL_SIZE, add_row, peak_memory_increase
from fastdiff.ops._packed import PackedWeightMixin

diffusers = pytest.importorskip("diffusers")

# Reduced size by default (128x128 images: 16x16 latents), the real sizes with --full-size.
UNET_RES = [256, 512] if FULL_SIZE else [128]
VAE_RES = 512 if FULL_SIZE else 128
TXT2IMG = dict(res=512, steps=20) if FULL_SIZE else dict(res=128, steps=4)
ROUNDS = 2 if FULL_SIZE else 1


def time_pair(fast, slow, rounds: int = ROUNDS) -> tuple[float, float, float, float]:
    """Best-of-``rounds`` seconds of each side, interleaved, after warm-up calls (seconds-long calls: the conftest
    timer's three warm-ups and seven rounds would take minutes per case), and the peak memory increase (MB) of each
    side during its timed calls. fastdiff is warmed up ``pack_after`` times: its layers pack their weights on that
    call (once per sampling run, see fastdiff.ops._packed), so the timed rounds are the steady-state step of a
    sampling loop; diffusers once."""
    for _ in range(PackedWeightMixin.pack_after):
        fast()
    slow()
    tf, te, mf, me = [], [], [], []
    for _ in range(rounds):
        for fn, ts, ms in ((fast, tf, mf), (slow, te, me)):
            box = {}

            def call(fn=fn, box=box):
                t0 = time.perf_counter()
                fn()
                box["s"] = time.perf_counter() - t0

            ms.append(peak_memory_increase(call))
            ts.append(box["s"])
    return min(tf), min(te), max(mf), max(me)


@pytest.fixture(scope="module")
def models():
    from fastdiff.models import unet_sd, vae

    # the SD1.5 configurations in diffusers' terms (tests/test_sd1_models.py checks them against the release's)
    torch.manual_seed(0)
    ref_u = diffusers.UNet2DConditionModel(**unet_sd.SD15.to_diffusers()).eval()
    ref_v = diffusers.AutoencoderKL(**vae.SD15.to_diffusers()).eval()
    ours_u = unet_sd.UNetSD(unet_sd.SD15).eval()
    ours_u.load_state_dict(ref_u.state_dict())
    ours_v = vae.AutoencoderKL(vae.SD15).eval()
    ours_v.load_state_dict(ref_v.state_dict())
    return ref_u, ours_u, ref_v, ours_v


def _record(benchmark, name, case, tf, te, flops=None, mem=None):
    row = add_row(name, case, tf, te, baseline="diffusers", tflops=flops / tf / 1e12 if flops else None,
                  peak_mb=(mem or {}).get("fastdiff_peak_mb"), peak_mb_base=(mem or {}).get("diffusers_peak_mb"))
    benchmark.extra_info.update(case=case, fastdiff_s=tf, diffusers_s=te, ratio_vs_diffusers=te / tf, **(mem or {}))
    print(f"\n{name} {case}: fastdiff {tf:.2f} s, diffusers {te:.2f} s, ratio {te / tf:.2f}"
          + (f", {row['tflops']:.3f} TFLOP/s" if flops else "")
          + (f", peak memory +{mem['fastdiff_peak_mb']:.0f} / +{mem['diffusers_peak_mb']:.0f} MB" if mem else ""))


def _unet_flops(model, x, t, c) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(x, t, c)
    return float(fc.get_total_flops())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("res", UNET_RES)
def test_unet_guided_step(benchmark, models, res, dname):
    """One classifier-free-guided UNet step: batch 2 (cond + uncond) at res x res, 77-token context."""
    ref_u, ours_u, _, _ = models
    dt = DTYPES[dname]
    ref_u, ours_u = ref_u.to(dt), ours_u.to(dt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, res // 8, res // 8, generator=g).to(dt)
    c = torch.randn(2, 77, 768, generator=g).to(dt)
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        fast = lambda: ours_u(x, t, c)  # noqa: E731
        slow = lambda: ref_u(x, t, c).sample  # noqa: E731
        flops = _unet_flops(ref_u, x, t, c)
        tf, te, mf, me = time_pair(fast, slow)
        mem = dict(fastdiff_peak_mb=mf, diffusers_peak_mb=me)
        _record(benchmark, "SD1 UNet guided step", f"{res}px b2 {dname}", tf, te, flops, mem)
        benchmark.pedantic(fast, rounds=1, iterations=1)
    ref_u.float(), ours_u.float()


@pytest.mark.parametrize("dname", list(DTYPES))
def test_vae_decode(benchmark, models, dname):
    _, _, ref_v, ours_v = models
    dt = DTYPES[dname]
    ref_v, ours_v = ref_v.to(dt), ours_v.to(dt)
    z = torch.randn(1, 4, VAE_RES // 8, VAE_RES // 8, generator=torch.Generator().manual_seed(1)).to(dt)
    with torch.inference_mode():
        fast = lambda: ours_v.decode(z)  # noqa: E731
        slow = lambda: ref_v.decode(z).sample  # noqa: E731
        tf, te, mf, me = time_pair(fast, slow)
        mem = dict(fastdiff_peak_mb=mf, diffusers_peak_mb=me)
        _record(benchmark, "SD1 VAE decode", f"{VAE_RES}px {dname}", tf, te, mem=mem)
        benchmark.pedantic(fast, rounds=1, iterations=1)
    ref_v.float(), ours_v.float()


def test_txt2img(benchmark, models, tmp_path):
    """The whole guided txt2img (DDIM; 20 steps at 512x512 with --full-size, else 4 steps at 128x128), text encoder
    + UNet + VAE, fp32, both libraries."""
    ref_u, ours_u, ref_v, ours_v = models
    import transformers

    from fastdiff.io import sd_checkpoint as ck
    from fastdiff.models.clip_tokenizer import CLIPTokenizer
    from fastdiff.models import clip_text
    from fastdiff.pipelines.sd1 import load_sd1

    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text.SD15.to_transformers())).eval()
    CLIPTokenizer.from_bundled().save_pretrained(tmp_path / "_tok")
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "_tok", local_files_only=True)
    ref = diffusers.StableDiffusionPipeline(vae=ref_v, text_encoder=text, tokenizer=tok, unet=ref_u,
                                            scheduler=diffusers.DDIMScheduler.from_config(ck.SD1_SCHEDULER_CONFIG),
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "sd")
    pipe = load_sd1(tmp_path / "sd")
    prompt = "a photo of an astronaut riding a horse on mars"
    res, steps = TXT2IMG["res"], TXT2IMG["steps"]
    fast = lambda: pipe.txt2img(prompt, steps=steps, sampler="ddim", seed=0, height=res, width=res)  # noqa: E731
    slow = lambda: ref(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       height=res, width=res, output_type="pt").images
    with torch.inference_mode():
        tf, te, mf, me = time_pair(fast, slow, rounds=1)
    _record(benchmark, f"SD1 txt2img {steps} steps", f"{res}px fp32 DDIM", tf, te,
            mem=dict(fastdiff_peak_mb=mf, diffusers_peak_mb=me))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
