"""Stable Diffusion 1.5 on this CPU: fastdiff vs diffusers on the same random full-size weights, same dtype and
threads, in one run (speed targets: bf16 512x512 guided step <= 2.3 s, >= 1.7x diffusers on the UNet
step in both dtypes, >= 1.5x on the VAE decode).

Run: ``pytest benchmarks/bench_sd1.py --benchmark-only -s``. Each case times the two sides interleaved (two
rounds each: a 512x512 step takes seconds) and reports the ratio, TFLOP/s of the UNet (2 x multiply-adds,
counted by torch's FLOP counter on the diffusers model) and the peak resident-memory increase during the call
(bytes in use by malloc, sampled every 5 ms: a CPU stand-in for torch.cuda.max_memory_allocated).
The whole 20-step 512x512 txt2img is the slowest case (minutes): ``-k "not txt2img"`` skips it.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest
import torch

from conftest import _ROWS

diffusers = pytest.importorskip("diffusers")

def time_pair(fast, slow, rounds: int = 2, min_time: float = 0.0) -> tuple[float, float]:
    """Best-of-``rounds`` seconds of each side, interleaved, after one warm-up call each (seconds-long calls: the
    conftest timer's three warm-ups and seven rounds would take minutes per case)."""
    fast(), slow()
    tf, te = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fast()
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slow()
        te.append(time.perf_counter() - t0)
    return min(tf), min(te)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):  # not glibc >= 2.33: no memory column
    _libc = None


def _in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap + mmapped chunks): torch's CPU tensors live there."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


def peak_memory_increase(fn) -> float:
    """Peak of the bytes in use while ``fn()`` ran, above what was in use before (sampled every 5 ms), in MB;
    NaN without glibc. A CPU stand-in for torch.cuda.max_memory_allocated (the allocator's cache is excluded:
    freed blocks are not in use)."""
    if _libc is None:
        return float("nan")
    base, peak, done = _in_use(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _in_use())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (max(peak[0], _in_use()) - base) / 2**20


@pytest.fixture(scope="module")
def models():
    from fastdiff.models import unet_sd, vae

    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_sd1_models import SD15_UNET_JSON, SD15_VAE_JSON

    torch.manual_seed(0)
    ref_u = diffusers.UNet2DConditionModel(**SD15_UNET_JSON).eval()
    ref_v = diffusers.AutoencoderKL(**SD15_VAE_JSON).eval()
    ours_u = unet_sd.UNetSD(unet_sd.SD15).eval()
    ours_u.load_state_dict(ref_u.state_dict())
    ours_v = vae.AutoencoderKL(vae.SD15).eval()
    ours_v.load_state_dict(ref_v.state_dict())
    return ref_u, ours_u, ref_v, ours_v


def _record(benchmark, name, case, tf, te, flops=None, mem=None):
    row = dict(name=name, case=case, fast=tf, eager=te)
    if flops:
        row["tflops"] = flops / tf / 1e12
    _ROWS.append(row)
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
@pytest.mark.parametrize("res", [256, 512])
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
        tf, te = time_pair(fast, slow, rounds=2, min_time=0.0)
        mem = dict(fastdiff_peak_mb=peak_memory_increase(fast), diffusers_peak_mb=peak_memory_increase(slow))
        _record(benchmark, "SD1 UNet guided step", f"{res}px b2 {dname}", tf, te, flops, mem)
        benchmark.pedantic(fast, rounds=1, iterations=1)
    ref_u.float(), ours_u.float()


@pytest.mark.parametrize("dname", list(DTYPES))
def test_vae_decode_512(benchmark, models, dname):
    _, _, ref_v, ours_v = models
    dt = DTYPES[dname]
    ref_v, ours_v = ref_v.to(dt), ours_v.to(dt)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to(dt)
    with torch.inference_mode():
        fast = lambda: ours_v.decode(z)  # noqa: E731
        slow = lambda: ref_v.decode(z).sample  # noqa: E731
        tf, te = time_pair(fast, slow, rounds=2, min_time=0.0)
        mem = dict(fastdiff_peak_mb=peak_memory_increase(fast), diffusers_peak_mb=peak_memory_increase(slow))
        _record(benchmark, "SD1 VAE decode", f"512px {dname}", tf, te, mem=mem)
        benchmark.pedantic(fast, rounds=1, iterations=1)
    ref_v.float(), ours_v.float()


def test_txt2img_20_steps_512(benchmark, models, tmp_path):
    """The whole 20-step 512x512 guided txt2img (DDIM), text encoder + UNet + VAE, fp32, both libraries."""
    ref_u, ours_u, ref_v, ours_v = models
    import transformers

    from fastdiff.io import sd_checkpoint as ck
    from fastdiff.models.clip_tokenizer import CLIPTokenizer
    from fastdiff.pipelines.sd1 import load_sd1
    from test_sd1_models import SD15_TEXT_JSON

    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_JSON)).eval()
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
    fast = lambda: pipe.txt2img(prompt, steps=20, sampler="ddim", seed=0)  # noqa: E731
    slow = lambda: ref(prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       output_type="pt").images
    with torch.inference_mode():
        tf, te = time_pair(fast, slow, rounds=1, min_time=0.0)
    _record(benchmark, "SD1 txt2img 20 steps", "512px fp32 DDIM", tf, te)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
