"""Sampler loop overhead per step with a trivial network: fused update vs eager update vs diffusers' loop.

The network is ``m = 0.5 * x`` (one cheap pass), so the time is the sampler's own cost per step: CFG batching,
the update, noise. Three ways, timed in the same run:

- fastdiff with the automatic backend (the fused ``sampler_step`` kernel when the extension is built);
- fastdiff forced to the ``ref`` backend (the same loop, the update in eager PyTorch);
- diffusers' scheduler loop (set_timesteps, scale_model_input, eager CFG combination, step).

Run: ``pytest benchmarks/bench_samplers.py --benchmark-only -s``.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff.samplers as S  # noqa: E402
from fastdiff.ops import use_backend  # noqa: E402

STEPS = 20
G = 7.5
# SD1 latents at 512 px (CFG doubles the network batch) and at 1024 px.
SHAPES = [(1, 4, 64, 64), (2, 4, 64, 64), (1, 4, 128, 128)]
CASES = [("ddim", "DDIMScheduler", {}), ("euler_a", "EulerAncestralDiscreteScheduler", {}),
         ("dpmpp_2m", "DPMSolverMultistepScheduler", {})]


def trivial(x, t, cond):
    return 0.5 * x


def _diffusers_loop(cls_name, x, uncond, cond):
    cls = getattr(diffusers, cls_name)
    sched = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False) \
        if cls_name == "DDIMScheduler" else cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)

    def run():
        sched.set_timesteps(STEPS)
        lat = x * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([lat, lat])
            inp = sched.scale_model_input(inp, t)
            out = trivial(inp, t, torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            lat = sched.step(u + G * (c - u), t, lat, generator=gen).prev_sample
        return lat

    return run


@pytest.mark.parametrize("baseline", ["eager_update", "diffusers"])
@pytest.mark.parametrize("name,cls_name,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sampler_loop(compare, name, cls_name, kw, shape, baseline):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.ones(shape[0]), torch.zeros(shape[0])
    sched = S.scaled_linear_schedule()
    fn = S.SAMPLERS[name]

    def fused():
        return fn(S.Denoiser(trivial, "eps"), x, sched, steps=STEPS, cond=cond, uncond=uncond, guidance=G,
                  generator=torch.Generator().manual_seed(0), **kw)

    def eager():
        with use_backend("ref"):
            return fused()

    if baseline == "eager_update":
        torch.testing.assert_close(fused(), eager(), rtol=1e-5, atol=1e-4)
        ratio = compare(f"{name} loop: fused vs eager update", f"{tuple(shape)} {STEPS} steps CFG", fused, eager)
    else:
        ratio = compare(f"{name} loop: fastdiff vs diffusers", f"{tuple(shape)} {STEPS} steps CFG", fused,
                        _diffusers_loop(cls_name, x, uncond, cond))
    print(f"{name} {shape}: {ratio:.2f}x {baseline}")
