"""SD1 txt2img against diffusers' StableDiffusionPipeline on the same (tiny, random) weights and sampler.

Same seed, same scheduler settings (the folder's scaled-linear betas, leading spacing, offset 1): fastdiff's
images must equal diffusers' within 1/255 per pixel, with classifier-free guidance, negative prompts and
several images per prompt.
"""
from __future__ import annotations

import pytest
import torch

from fastdiff.pipelines.sd1 import load_sd1

diffusers = pytest.importorskip("diffusers")

_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_txt2img_matches_diffusers(ref_folder, sampler):
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
    # random weights saturate many pixels; enough must lie strictly inside (0, 1) for the check to mean something
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.6), ("euler", 0.75), ("euler_a", 0.5), ("dpmpp_2m", 0.8),
                                               ("ddpm", 0.5)])
def test_img2img_matches_diffusers(ref_folder, sampler, strength):
    """Same image as diffusers' StableDiffusionImg2ImgPipeline on the same weights, scheduler and seed."""
    d, ref = ref_folder
    sched = {"ddpm": "DDPMScheduler"}.get(sampler) or _SCHEDULERS[sampler]
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**{**ref.components, "scheduler": getattr(
        diffusers, sched).from_config(ref.scheduler.config)})
    img2img.set_progress_bar_config(disable=True)
    pipe = load_sd1(d / "sd")
    g = torch.Generator().manual_seed(5)
    image = (0.5 + 0.4 * torch.sin(torch.linspace(0, 9, 3 * 64 * 48)).reshape(1, 3, 64, 48)).clamp(0, 1)
    image = (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)
    prompts = ["a photo of a cat", "a watercolour of a boat"]
    ours = pipe.img2img(prompts, image, strength=strength, steps=5, sampler=sampler, guidance=5.0,
                        generator=torch.Generator().manual_seed(7), num_images_per_prompt=2)
    theirs = img2img(prompts, image=image, strength=strength, num_inference_steps=5, guidance_scale=5.0,
                     num_images_per_prompt=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ours.shape == theirs.shape == (4, 3, 64, 48)
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


def test_img2img_bad_input(ref_folder):
    d, _ = ref_folder
    pipe = load_sd1(d / "sd")
    image = torch.rand(1, 3, 32, 32)
    for bad in (-0.1, 1.5, "high"):
        with pytest.raises(ValueError, match="strength"):
            pipe.img2img("a cat", image, strength=bad, steps=2)
    with pytest.raises(ValueError, match="no step to run"):
        pipe.img2img("a cat", image, strength=0.1, steps=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.img2img("a cat", torch.rand(1, 3, 30, 32), steps=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe.img2img("a cat", image * 3, steps=2)
    # strength 1 re-runs the whole schedule: the image only enters through the (tiny) x0 term of the start
    a = pipe.img2img("a cat", image, strength=1.0, steps=2, seed=1, sampler="ddim")
    b = pipe.img2img("a cat", image, strength=1.0, steps=2, seed=1, sampler="ddim")
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_inpaint_by_mask_blending_matches_diffusers(ref_folder, sampler):
    """An ordinary 4-channel checkpoint inpaints by mask blending: the same image as diffusers'
    StableDiffusionInpaintPipeline (which blends for 4-channel UNets) on the same weights and seed."""
    d, ref = ref_folder
    inpaint = diffusers.StableDiffusionInpaintPipeline(**{**ref.components, "scheduler": getattr(
        diffusers, _SCHEDULERS[sampler]).from_config(ref.scheduler.config)})
    inpaint.set_progress_bar_config(disable=True)
    pipe = load_sd1(d / "sd")
    image = (0.5 + 0.4 * torch.cos(torch.linspace(0, 7, 3 * 64 * 48)).reshape(1, 3, 64, 48)).clamp(0, 1)
    mask = torch.zeros(1, 1, 64, 48)
    mask[..., 16:48, 8:40] = 1.0
    ours = pipe.inpaint(["a red ball", "a dog"], image, mask, steps=4, sampler=sampler, guidance=5.0,
                        generator=torch.Generator().manual_seed(11))
    theirs = inpaint(["a red ball", "a dog"], image=image, mask_image=mask, num_inference_steps=4, guidance_scale=5.0,
                     height=64, width=48, generator=torch.Generator().manual_seed(11), output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 64, 48)
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


def test_txt2img_seed_and_inputs(ref_folder):
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


def test_inpaint_matches_diffusers(tmp_path, randomize):
    """A tiny random SD1.5-inpainting model (9-channel UNet) saved by diffusers: same repainted image."""
    from fastdiff.models import clip_text, unet_sd, vae
    from fastdiff.models.clip_tokenizer import CLIPTokenizer
    from fastdiff.io import sd_checkpoint as ck

    transformers = pytest.importorskip("transformers")
    ucfg = {**unet_sd.TINY.to_diffusers(), "in_channels": 9}
    unet = randomize(diffusers.UNet2DConditionModel(**{k: v for k, v in ucfg.items() if k != "_class_name"}), 11)
    ae = randomize(diffusers.AutoencoderKL(**{k: v for k, v in vae.TINY.to_diffusers().items() if k != "_class_name"}), 12)
    tc = {k: v for k, v in clip_text.TINY.to_transformers().items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**tc)), 13)
    CLIPTokenizer.from_bundled().save_pretrained(tmp_path / "tok")
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    ref = diffusers.StableDiffusionInpaintPipeline(
        vae=ae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(ck.SD1_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "inpaint")
    pipe = load_sd1(tmp_path / "inpaint")
    assert pipe.is_inpainting

    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 32, 48, generator=g)
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 16:40] = 1.0
    ours = pipe.inpaint("a red door", image, mask, steps=3, guidance=5.0, sampler="ddim",
                        generator=torch.Generator().manual_seed(9), num_images_per_prompt=2)
    theirs = ref("a red door", image=image, mask_image=mask, num_inference_steps=3, guidance_scale=5.0,
                 height=32, width=48, num_images_per_prompt=2, generator=torch.Generator().manual_seed(9),
                 output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 48)
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"
    with pytest.raises(ValueError, match="mask size"):
        pipe.inpaint("x", image, mask[..., :16, :], steps=1)
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        pipe.txt2img("x", height=32, width=32, steps=1)


def test_load_pipeline_and_generate_with_a_prompt(ref_folder, tmp_path):
    """fastdiff.load_pipeline recognises SD1 folders and single files; fastdiff.generate(prompt, model=...) and
    `fastdiff generate --prompt` give the pipeline's own image (same seed), with the settings in the PNG."""
    import subprocess
    import sys

    from PIL import Image

    import fastdiff
    from fastdiff.models.unet_sd import UNetSD

    d, _ = ref_folder
    pipe = fastdiff.load_pipeline(d / "sd")
    assert isinstance(pipe.unet, UNetSD)
    pipe.save_single_file(tmp_path / "tiny.safetensors")
    again = fastdiff.load_pipeline(tmp_path / "tiny.safetensors")
    assert type(again) is type(pipe)
    want = pipe.txt2img("a cat", height=32, width=32, steps=2, sampler="ddim", seed=3, guidance=4.0)
    ims = fastdiff.generate("a cat", model=d / "sd", height=32, width=32, steps=2, sampler="ddim", seed=3,
                            guidance=4.0, progress=False)
    assert len(ims) == 1 and ims[0].size == (32, 32)
    got = torch.from_numpy(__import__("numpy").asarray(ims[0])).permute(2, 0, 1).float() / 255
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6
    out = tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--model", str(d / "sd"), "--prompt", "a cat",
                        "--height", "32", "--width", "32", "--steps", "2", "--sampler", "ddim", "--seed", "3",
                        "--guidance", "4", "--quiet", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    png = Image.open(out)
    assert png.text["fastdiff:prompt"] == "a cat" and png.text["fastdiff:seed"] == "3"
    assert png.text["fastdiff:sampler"] == "ddim" and png.text["fastdiff:steps"] == "2"
    assert (torch.from_numpy(__import__("numpy").asarray(png.convert("RGB"))).permute(2, 0, 1).float() / 255
            - want[0]).abs().max() <= 1 / 255 + 1e-6
    # bad input: clear errors, exit code 2, nothing written
    bad = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--model", str(d / "sd"), "--prompt", "x",
                          "--height", "30", "--quiet", "--out", str(tmp_path / "bad.png")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr and not (tmp_path / "bad.png").exists()
    with pytest.raises(ValueError, match="cannot be read"):
        fastdiff.generate("x", model=pipe, init_image=tmp_path / "cat.txt", progress=False)
    with pytest.raises(ValueError, match="Stable Diffusion checkpoint"):
        fastdiff.generate("a cat")
    with pytest.raises(ValueError, match="pixel model"):
        fastdiff.generate("a cat", model=fastdiff.load_pipeline())
