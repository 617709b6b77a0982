"""Sampling throughput (images/s) of the bundled default model (fastdiff/assets/fashion32): fastdiff's pipeline
with DDIM vs diffusers' DDIM on the same weights, in one run.

    pytest benchmarks/bench_sampling.py --benchmark-only -s

diffusers' ``DDIMPipeline`` calls ``unet(image, t)`` without class labels, which a class-conditional
``UNet2DModel`` refuses; the diffusers side is therefore DDIMPipeline's loop written out with the labels
passed (``UNet2DModel.from_pretrained`` + ``DDIMScheduler.from_pretrained`` of the same folder, eta 0), and with
guidance the conditional and unconditional halves in one batched forward, as fastdiff does. Both sides start
from the same noise; the benchmark checks that they end at the same images before timing them.

Images/s and the ratio are in ``extra_info`` and the summary table; one timed round of each side by default (the
parity check's calls are the warm-up), three with ``--full-size``.
"""
import statistics
import time

import pytest
import torch

from conftest import FULL_SIZE, add_row
from fastdiff.pipelines.pixel import bundled_model_dir, load_pixel_pipeline

diffusers = pytest.importorskip("diffusers")
ROUNDS = 3 if FULL_SIZE else 1

STEPS = 20
PER_CLASS = 4  # the labelled grid `fastdiff generate` writes: 10 classes x 4


def _diffusers_ddim(unet, sched, noise, labels, guidance, bf16):
    null = torch.full_like(labels, unet.config.num_class_embeds - 1)
    sched.set_timesteps(STEPS)
    x = noise.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for t in sched.timesteps:
            if guidance is None:
                out = unet(x, t, class_labels=labels).sample.float()
            else:
                both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.float()
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = sched.step(out, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("guidance", [None, 3.0], ids=["no-cfg", "cfg3"])
def test_ddim_sampling_throughput(benchmark, guidance, precision):
    bf16 = precision == "bf16"
    folder = bundled_model_dir()
    pipe = load_pixel_pipeline(folder)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).float().eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    cfg = pipe.unet.config
    labels = torch.arange(cfg.num_classes).repeat_interleave(PER_CLASS)
    noise = torch.randn((len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                        generator=torch.Generator().manual_seed(0))

    def ours():
        return pipe.sample(labels.tolist(), sampler="ddim", steps=STEPS, guidance=guidance, noise=noise,
                           precision=precision)

    def theirs():
        return _diffusers_ddim(unet, sched, noise, labels, guidance, bf16)

    # Same work: the same images at the end (bf16 runs round differently: a looser, still decisive bound).
    diff = (ours() * 2 - 1 - theirs()).abs().max().item()  # fastdiff returns [0, 1], the loop [-1, 1]
    assert diff < (0.1 if bf16 else 1e-3), f"fastdiff and diffusers disagree by {diff}"
    times = {"fastdiff": [], "diffusers": []}
    for _ in range(ROUNDS):  # interleaved rounds: load from other processes hits both sides alike
        for name, fn in (("fastdiff", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    n = len(labels)
    info = {"img_per_s_fastdiff": n / sec["fastdiff"], "img_per_s_diffusers": n / sec["diffusers"],
            "ratio_vs_diffusers": sec["diffusers"] / sec["fastdiff"], "seconds_fastdiff": sec["fastdiff"],
            "seconds_diffusers": sec["diffusers"], "images": n, "steps": STEPS, "max_abs_diff": diff,
            "threads": torch.get_num_threads()}
    benchmark.extra_info.update(info)
    add_row("bundled model DDIM sampling", f"{n} images {STEPS} steps guidance {guidance} {precision}",
            sec["fastdiff"], sec["diffusers"], baseline="diffusers")
    benchmark.group = "bundled model DDIM sampling (img/s)"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the interleaved timings above are the measurement
    print(f"\nDDIM {STEPS} steps x {n} images, guidance {guidance}, {precision}: fastdiff "
          f"{info['img_per_s_fastdiff']:.1f} img/s ({sec['fastdiff']:.2f} s), diffusers "
          f"{info['img_per_s_diffusers']:.1f} img/s ({sec['diffusers']:.2f} s): {info['ratio_vs_diffusers']:.2f}x")
