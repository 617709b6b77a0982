"""SD1 txt2img with ControlNets against diffusers' StableDiffusionControlNetPipeline on the same (tiny, random)
weights, control images, scheduler and seed.

Oracle: diffusers. The ControlNets are ``ControlNetModel.from_unet`` of the reference UNet with every weight
re-drawn (:mod:`sd1_builders`), saved with ``save_pretrained`` and loaded by ``fastdiff.load_controlnet``.
fastdiff's images must equal diffusers' within 1/255 per pixel (the SD1 pipeline parity rule) with one
ControlNet, two ControlNets, a ``[control_start, control_end]`` window, and scale 0 must be the plain pipeline;
img2img and inpainting with a ControlNet against StableDiffusionControlNetImg2ImgPipeline and
StableDiffusionControlNetInpaintPipeline likewise.
"""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.pipelines.sd1 import load_sd1

diffusers = pytest.importorskip("diffusers")
from sd1_builders import random_controlnet  # noqa: E402

_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler"}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, 8k"]


@pytest.fixture(scope="module")
def controlnets(ref_folder, tmp_path_factory):
    """Two random diffusers ControlNets for the reference UNet and fastdiff's loads of them."""
    _, ref = ref_folder
    d = tmp_path_factory.mktemp("controlnets")
    refs, ours = [], []
    for j, seed in enumerate((21, 22)):
        net = random_controlnet(ref.unet, seed, hint=(8, 16))  # downscales 2x, as the tiny VAE
        net.save_pretrained(d / f"cn{j}")
        refs.append(net)
        ours.append(fastdiff.load_controlnet(d / f"cn{j}"))
    return refs, ours


def _control(b: int, seed: int, h: int = 64, w: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _reference(ref, nets, sampler):
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{**{k: v for k, v in ref.components.items() if k != "image_encoder"}, "controlnet": nets,
           "scheduler": getattr(diffusers, _SCHEDULERS[sampler]).from_config(ref.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_parity(ours: torch.Tensor, theirs: torch.Tensor, shape: tuple) -> None:
    assert ours.shape == theirs.shape == shape
    # random weights saturate many pixels; enough must lie strictly inside (0, 1) for the check to mean something
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


@pytest.mark.parametrize("sampler,per_prompt", [("euler", False), ("dpmpp_2m", True)])
def test_one_controlnet_matches_diffusers(ref_folder, controlnets, sampler, per_prompt):
    """One ControlNet, guided, 2 prompts x 2 images; a control image for all (batch 1) or one per prompt."""
    d, ref = ref_folder
    (ref_cn, _), (cn, _) = controlnets
    pipe = load_sd1(d / "sd")
    control = _control(2 if per_prompt else 1, 3)
    kw = dict(negative_prompt=["blurry", "low quality"], guidance=5.0, num_images_per_prompt=2)
    ours = pipe.txt2img(PROMPTS, height=64, width=48, steps=4, sampler=sampler, control=control, controlnet=cn,
                        control_scale=0.8, generator=torch.Generator().manual_seed(42), **kw)
    theirs = _reference(ref, ref_cn, sampler)(
        PROMPTS, image=control, negative_prompt=kw["negative_prompt"], num_inference_steps=4, guidance_scale=5.0,
        height=64, width=48, num_images_per_prompt=2, controlnet_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(42), output_type="pt").images
    _assert_parity(ours, theirs, (4, 3, 64, 48))
    # the ControlNet changes the image (a test of the residuals, not of a no-op)
    plain = pipe.txt2img(PROMPTS, height=64, width=48, steps=4, sampler=sampler,
                         generator=torch.Generator().manual_seed(42), **kw)
    assert (plain - ours).abs().max() > 0.1


def test_two_controlnets_and_a_window_match_diffusers(ref_folder, controlnets):
    """Two ControlNets with their own scales, the second only in [0.2, 0.8] of the steps (5 steps: steps 1..3)."""
    d, ref = ref_folder
    refs, nets = controlnets
    pipe = load_sd1(d / "sd")
    controls = [_control(1, 4), _control(2, 5)]
    ours = pipe.txt2img(PROMPTS, height=64, width=48, steps=5, sampler="euler", guidance=4.0, control=controls,
                        controlnet=nets, control_scale=[0.7, 1.2], control_start=[0.0, 0.2], control_end=[1.0, 0.8],
                        generator=torch.Generator().manual_seed(8))
    theirs = _reference(ref, refs, "euler")(
        PROMPTS, image=controls, num_inference_steps=5, guidance_scale=4.0, height=64, width=48,
        controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.8],
        generator=torch.Generator().manual_seed(8), output_type="pt").images
    _assert_parity(ours, theirs, (2, 3, 64, 48))


def test_window_matches_diffusers_unguided(ref_folder, controlnets):
    """One ControlNet in [0.2, 0.8] of 5 ddim steps, no classifier-free guidance (batch not doubled)."""
    d, ref = ref_folder
    (ref_cn, _), (cn, _) = controlnets
    pipe = load_sd1(d / "sd")
    control = _control(1, 6)
    ours = pipe.txt2img("a red door", height=64, width=48, steps=5, sampler="ddim", guidance=1.0, control=control,
                        controlnet=cn, control_start=0.2, control_end=0.8, generator=torch.Generator().manual_seed(1))
    theirs = _reference(ref, ref_cn, "ddim")(
        "a red door", image=control, num_inference_steps=5, guidance_scale=1.0, height=64, width=48,
        control_guidance_start=0.2, control_guidance_end=0.8, generator=torch.Generator().manual_seed(1),
        output_type="pt").images
    _assert_parity(ours, theirs, (1, 3, 64, 48))
    full = pipe.txt2img("a red door", height=64, width=48, steps=5, sampler="ddim", guidance=1.0, control=control,
                        controlnet=cn, generator=torch.Generator().manual_seed(1))
    assert (full - ours).abs().max() > 0.05  # the window matters


def test_scale_zero_is_the_plain_pipeline(ref_folder, controlnets):
    d, _ = ref_folder
    _, (cn, cn2) = controlnets
    pipe = load_sd1(d / "sd")
    kw = dict(height=64, width=48, steps=3, sampler="euler", guidance=5.0)
    plain = pipe.txt2img("a cat", seed=2, **kw)
    zero = pipe.txt2img("a cat", seed=2, control=_control(1, 7), controlnet=cn, control_scale=0.0, **kw)
    assert torch.equal(plain, zero)
    zero2 = pipe.txt2img("a cat", seed=2, control=[_control(1, 7), _control(1, 8)], controlnet=[cn, cn2],
                         control_scale=0, **kw)
    assert torch.equal(plain, zero2)


def _image(seed: int) -> torch.Tensor:
    """A smooth init image with a little noise (random pixels would make the VAE's latents meaningless)."""
    g = torch.Generator().manual_seed(seed)
    image = (0.5 + 0.4 * torch.sin(torch.linspace(0, 9, 3 * 64 * 48) + seed).reshape(1, 3, 64, 48)).clamp(0, 1)
    return (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)


def _pipeline(cls: str, ref, nets, sampler):
    pipe = getattr(diffusers, cls)(
        **{**{k: v for k, v in ref.components.items() if k != "image_encoder"}, "controlnet": nets,
           "scheduler": getattr(diffusers, _SCHEDULERS[sampler]).from_config(ref.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_img2img_with_a_controlnet_matches_diffusers(ref_folder, controlnets, sampler):
    """img2img + ControlNet against StableDiffusionControlNetImg2ImgPipeline: strength 0.75 of 8 steps (6 run),
    guided, 2 prompts x 2 images, the ControlNet in [0.2, 1.0] of the steps that run (steps 2..5 of 6: a window
    counted over all 8 steps would start a step earlier)."""
    d, ref = ref_folder
    (ref_cn, _), (cn, _) = controlnets
    pipe = load_sd1(d / "sd")
    image, control = _image(5), _control(1, 13)
    kw = dict(negative_prompt=["blurry", "low quality"], guidance=5.0, num_images_per_prompt=2)
    ours = pipe.img2img(PROMPTS, image, strength=0.75, steps=8, sampler=sampler, control=control, controlnet=cn,
                        control_scale=0.9, control_start=0.2, generator=torch.Generator().manual_seed(7), **kw)
    theirs = _pipeline("StableDiffusionControlNetImg2ImgPipeline", ref, ref_cn, sampler)(
        PROMPTS, image=image, control_image=control, strength=0.75, num_inference_steps=8, guidance_scale=5.0,
        negative_prompt=kw["negative_prompt"], height=64, width=48, num_images_per_prompt=2,
        controlnet_conditioning_scale=0.9, control_guidance_start=0.2, generator=torch.Generator().manual_seed(7),
        output_type="pt").images
    _assert_parity(ours, theirs, (4, 3, 64, 48))
    plain = pipe.img2img(PROMPTS, image, strength=0.75, steps=8, sampler=sampler,
                         generator=torch.Generator().manual_seed(7), **kw)
    assert (plain - ours).abs().max() > 0.05  # the ControlNet matters


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_inpaint_with_a_controlnet_matches_diffusers(ref_folder, controlnets, sampler):
    """Inpainting by mask blending (4-channel UNet) + ControlNet against StableDiffusionControlNetInpaintPipeline
    at strength 1, guided, 2 prompts, one control image per prompt."""
    d, ref = ref_folder
    (ref_cn, _), (cn, _) = controlnets
    pipe = load_sd1(d / "sd")
    image, control = _image(6), _control(2, 14)
    mask = torch.zeros(1, 1, 64, 48)
    mask[..., 16:48, 8:40] = 1.0
    prompts = ["a red ball", "a dog"]
    ours = pipe.inpaint(prompts, image, mask, steps=4, sampler=sampler, guidance=5.0, control=control,
                        controlnet=cn, control_scale=1.1, generator=torch.Generator().manual_seed(11))
    theirs = _pipeline("StableDiffusionControlNetInpaintPipeline", ref, ref_cn, sampler)(
        prompts, image=image, mask_image=mask, control_image=control, num_inference_steps=4, guidance_scale=5.0,
        height=64, width=48, controlnet_conditioning_scale=1.1, generator=torch.Generator().manual_seed(11),
        output_type="pt").images
    _assert_parity(ours, theirs, (2, 3, 64, 48))
    plain = pipe.inpaint(prompts, image, mask, steps=4, sampler=sampler, guidance=5.0,
                         generator=torch.Generator().manual_seed(11))
    assert (plain - ours).abs().max() > 0.05


def test_img2img_and_inpaint_take_a_controlnet(ref_folder, controlnets):
    """The ControlNet reaches img2img and inpainting (its residuals change the image; scale 0 changes nothing)."""
    d, _ = ref_folder
    _, (cn, _) = controlnets
    pipe = load_sd1(d / "sd")
    image = _control(1, 9)
    mask = torch.zeros(1, 1, 64, 48)
    mask[..., 16:48, 8:40] = 1.0
    for call in (lambda **c: pipe.img2img("a cat", image, strength=0.75, steps=4, seed=3, **c),
                 lambda **c: pipe.inpaint("a cat", image, mask, steps=3, seed=3, **c)):
        plain = call()
        assert torch.equal(plain, call(control=_control(1, 10), controlnet=cn, control_scale=0.0))
        assert (plain - call(control=_control(1, 10), controlnet=cn)).abs().max() > 0.05


def test_bad_control_inputs(ref_folder, controlnets):
    d, _ = ref_folder
    _, (cn, cn2) = controlnets
    pipe = load_sd1(d / "sd")
    kw = dict(height=64, width=48, steps=1)
    ok = _control(1, 0)
    cases = [
        (dict(control=ok), r"^control: a control image needs a ControlNet"),
        (dict(controlnet=cn), r"^controlnet: a ControlNet needs a control image"),
        (dict(control=_control(1, 0, 32, 48), controlnet=cn), r"^control: control image size 32x48 differs from "
                                                              r"the output size 64x48"),
        (dict(control=ok * 2, controlnet=cn), r"^control: values must lie in \[0, 1\]"),
        (dict(control=torch.rand(1, 1, 64, 48), controlnet=cn), r"^control: expected shape \(B, 3, H, W\)"),
        (dict(control=_control(3, 0), controlnet=cn), r"^control: a batch of 3 control images for 1 prompts"),
        (dict(control=[ok], controlnet=[cn, cn2]), r"^control: 1 control images for 2 ControlNets"),
        (dict(control=ok, controlnet=[cn, cn2]), r"^control: give one control image per ControlNet"),
        (dict(control=[ok, ok], controlnet=[cn, cn2], control_scale=[1.0]), r"^control_scale: 1 values for 2"),
        (dict(control=ok, controlnet=cn, control_scale=[1.0]), r"^control_scale: a list needs a list of ControlNets"),
        (dict(control=ok, controlnet=cn, control_start=0.8, control_end=0.2), r"^control_start: 0.8 must be below"),
        (dict(control=ok, controlnet=cn, control_end=1.5), r"^control_end:"),
        (dict(control=[ok, ok], controlnet=[cn, "x"]), r"^controlnet\[1\]: must be a fastdiff ControlNet"),
        (dict(control="x.png", controlnet=cn), r"^control: must be a tensor or a PIL image"),
    ]
    for args, msg in cases:
        with pytest.raises(fastdiff.InvalidArgument, match=msg) as e:
            pipe.txt2img("a cat", **kw, **args)
        assert "\n" not in str(e.value)
    # a PIL control image is read like init_image (RGB in [0, 1])
    from PIL import Image

    pil = Image.fromarray((ok[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    a = pipe.txt2img("a cat", seed=1, control=pil, controlnet=cn, **kw)
    b = pipe.txt2img("a cat", seed=1, control=torch.from_numpy(__import__("numpy").asarray(pil)).permute(2, 0, 1)
                     .float()[None] / 255, controlnet=cn, **kw)
    assert torch.equal(a, b)


def test_cli_generate_with_a_controlnet(ref_folder, controlnets, tmp_path, capsys):
    """`fastdiff generate --controlnet DIR --control-image PNG --control-scale S` writes the pipeline's image."""
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    d, _ = ref_folder
    (ref_cn, _), (cn, _) = controlnets
    ref_cn.save_pretrained(tmp_path / "cn")
    png = tmp_path / "edges.png"
    Image.fromarray((_control(1, 12)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(png)
    out = tmp_path / "out.png"
    code = main(["generate", "--model", str(d / "sd"), "--prompt", "a cat", "--height", "64", "--width", "48",
                 "--steps", "2", "--sampler", "ddim", "--seed", "3", "--guidance", "4", "--controlnet",
                 str(tmp_path / "cn"), "--control-image", str(png), "--control-scale", "0.7", "--quiet", "--out",
                 str(out)])
    assert code == 0, capsys.readouterr().err
    want = load_sd1(d / "sd").txt2img("a cat", height=64, width=48, steps=2, sampler="ddim", seed=3, guidance=4.0,
                                      control=Image.open(png), controlnet=cn, control_scale=0.7)
    got = Image.open(out)
    assert got.text["fastdiff:control_scale"] == "0.7"
    got = torch.from_numpy(np.asarray(got.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6
    # a control image of the wrong size: one line, exit 2, nothing written
    Image.open(png).resize((32, 32)).save(tmp_path / "small.png")
    code = main(["generate", "--model", str(d / "sd"), "--prompt", "a cat", "--height", "64", "--width", "48",
                 "--steps", "1", "--controlnet", str(tmp_path / "cn"), "--control-image", str(tmp_path / "small.png"),
                 "--quiet", "--out", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err
    assert code == 2 and "control image size 32x32 differs from the output size 64x48" in err
    assert not (tmp_path / "bad.png").exists()
