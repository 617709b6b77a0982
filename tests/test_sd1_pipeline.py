"""SD1 txt2img against diffusers' StableDiffusionPipeline on the same (tiny, random) weights and sampler.

Same seed, same scheduler settings (the folder's scaled-linear betas, leading spacing, offset 1): fastdiff's
images must equal diffusers' within 1/255 per pixel, with classifier-free guidance, negative prompts and
several images per prompt.
"""
from __future__ import annotations

import pytest
import torch

from fastdiff.pipelines.sd1 import load_sd1
from tests.test_sd1_checkpoints import ref_folder  # noqa: F401  (module fixture: a diffusers-saved tiny SD1)

diffusers = pytest.importorskip("diffusers")

_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_txt2img_matches_diffusers(ref_folder, sampler):  # noqa: F811
    d, ref = ref_folder
    ref.scheduler = getattr(diffusers, _SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = load_sd1(d / "sd")
    kw = dict(height=64, width=48, guidance=5.0)
    prompts = ["a photo of a cat", "an astronaut riding a horse, 8k"]
    ours = pipe.txt2img(prompts, negative_prompt=["blurry", "low quality"], steps=4, sampler=sampler,
                        generator=torch.Generator().manual_seed(42), num_images_per_prompt=2, **kw)
    theirs = ref(prompts, negative_prompt=["blurry", "low quality"], num_inference_steps=4, guidance_scale=5.0,
                 height=64, width=48, num_images_per_prompt=2, generator=torch.Generator().manual_seed(42),
                 output_type="pt").images
    assert ours.shape == theirs.shape == (4, 3, 64, 48)
    assert ours.std() > 0.01  # not a blank image
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


def test_txt2img_seed_and_inputs(ref_folder):  # noqa: F811
    d, ref = ref_folder
    pipe = load_sd1(d / "sd")
    a = pipe.txt2img("a cat", height=32, width=32, steps=2, seed=3, sampler="ddim")
    b = pipe.txt2img("a cat", height=32, width=32, steps=2, seed=3, sampler="ddim")
    c = pipe.txt2img("a cat", height=32, width=32, steps=2, seed=4, sampler="ddim")
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.txt2img("a cat", height=60, width=32)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.txt2img("a cat", height=32, width=32, sampler="plms")
    with pytest.raises(ValueError, match="negative prompts"):
        pipe.txt2img(["a", "b"], negative_prompt=["x"], height=32, width=32, steps=1)
    with pytest.warns(UserWarning, match="dropped"):
        pipe.encode_prompt("word " * 80 + "tail end")
