"""Bad input at the Python front door: ``fastdiff.generate``, ``load_pipeline``, ``txt2img`` / ``img2img`` /
``inpaint`` of both Stable Diffusion families and the pixel pipeline's ``sample``.

Each row feeds one argument a bad value: the call must raise :class:`fastdiff.InvalidArgument` (a ValueError and
a TypeError) whose one-line message starts with the argument's name and says what is allowed, before any network
runs (forward hooks count the calls), any progress bar shows (stderr stays empty) or any file is written (the
working folder stays empty). No diffusers needed: the pipelines are fastdiff's own tiny modules.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff import InvalidArgument
from fastdiff.models import clip_text, mmdit, unet2d, unet_sd, vae
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.pipelines.pixel import PixelPipeline
from fastdiff.pipelines.sd1 import StableDiffusion1
from fastdiff.pipelines.sd3 import StableDiffusion3
from fastdiff.samplers import make_schedule

IMG = torch.full((1, 3, 32, 32), 0.5)
MASK = torch.zeros(1, 1, 32, 32)


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    return StableDiffusion1(unet_sd.UNetSD(unet_sd.TINY).eval(), vae.AutoencoderKL(vae.TINY).eval(),
                            clip_text.CLIPTextModel(clip_text.TINY).eval(), CLIPTokenizer.from_bundled())


@pytest.fixture(scope="module")
def sd3():
    """Text encoders freed: generation from embeddings (the checks come first either way)."""
    torch.manual_seed(0)
    return StableDiffusion3(mmdit.MMDiT(mmdit.TINY).eval(), vae.AutoencoderKL(vae.TINY).eval(),
                            None, None, None, None, None, None)


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    return PixelPipeline(unet2d.UNet2D(unet2d.TINY).eval(), make_schedule("cosine", 1000), "v", 1.0)


def _embeds(p):
    c = p.transformer.config
    return torch.zeros(1, 8, c.joint_attention_dim), torch.zeros(1, c.pooled_projection_dim)


# (entry point, keyword arguments of a good call, argument, bad values, a piece of the message saying what is allowed)
GOOD = {
    "generate": {"prompt": None, "label": 0, "n": 1, "steps": 1, "progress": False},
    "generate_sd": {"prompt": "a cat", "n": 1, "steps": 1, "progress": False},
    "load_pipeline": {},
    "sd1.txt2img": {"prompt": "a cat", "height": 32, "width": 32, "steps": 1},
    "sd1.img2img": {"prompt": "a cat", "image": IMG, "steps": 2},
    "sd1.inpaint": {"prompt": "a cat", "image": IMG, "mask": MASK, "steps": 1},
    "sd3.txt2img": {"prompt_embeds": "EMB", "negative_prompt_embeds": "EMB", "height": 32, "width": 32, "steps": 1},
    "sd3.img2img": {"prompt": None, "prompt_embeds": "EMB", "negative_prompt_embeds": "EMB", "image": IMG,
                    "steps": 2},
    "pixel.sample": {"labels": [1, 2], "steps": 1},
}
BAD = [
    ("generate", "n", [-3, 0, "two", 1.5], "integer >= 1"),
    ("generate", "seed", [-1, 1.5, "x"], "integer >= 0"),
    ("generate", "steps", [0, -5, 2.0], "integer >= 1"),
    ("generate", "sampler", ["foo", 3], "choose one of ddpm, ddim"),
    ("generate", "guidance", [-1, math.nan, "strong"], "[0, inf)"),
    ("generate", "height", [30, 0, "512"], "multiple of 8"),
    ("generate", "width", [12, -8], "multiple of 8"),
    ("generate", "strength", [1.5, -0.1, "high"], "[0, 1]"),
    ("generate", "prompt", [3, ["a"]], "string"),
    ("generate", "negative_prompt", [5], "string"),
    ("generate", "label", [True, 2.5], "class name or index"),
    ("generate", "progress", ["yes"], "True or False"),
    ("generate", "model", [3], "path"),
    ("generate", "init_image", [5], "path, a PIL image"),
    ("generate_sd", "mask", [IMG[:, :1]], "needs init_image"),
    ("generate_sd", "model", [None], "Stable Diffusion checkpoint"),
    ("load_pipeline", "path", [3, 2.5], "path"),
    ("load_pipeline", "dtype", ["fp16", torch.int8], "torch.float32"),
    ("load_pipeline", "device", ["tpu", None], "torch device"),
    ("sd1.txt2img", "prompt", [None, 3, [], ["a", 1]], "string"),
    ("sd1.txt2img", "negative_prompt", [["x", "y"], ["x", "y", "z"]], "one per prompt"),
    ("sd1.txt2img", "negative_prompt", [3, [1]], "string"),
    ("sd1.txt2img", "height", [30, 0, -8, 32.0, "32"], "positive multiple of 8"),
    ("sd1.txt2img", "width", [12], "positive multiple of 8"),
    ("sd1.txt2img", "steps", [0, -1, 1.5, "20"], "integer >= 1"),  # None: the pipeline's default
    ("sd1.txt2img", "guidance", [-1.0, math.inf, "7"], "[0, inf)"),
    ("sd1.txt2img", "sampler", ["plms", "", 3], "choose one of"),
    ("sd1.txt2img", "sampler", ["flow_euler"], "choose one of ddpm"),
    ("sd1.txt2img", "seed", [-1, 2.5, "7"], "integer >= 0"),
    ("sd1.txt2img", "generator", [7], "torch.Generator"),
    ("sd1.txt2img", "num_images_per_prompt", [0, -2, 1.0], "integer >= 1"),
    ("sd1.txt2img", "clip_skip", [-1, 0.5], "integer >= 0"),
    ("sd1.txt2img", "latents", [torch.zeros(1, 4, 8, 8), "noise"], "latents"),
    ("sd1.txt2img", "callback", [5], "callable"),
    ("sd1.img2img", "strength", [-0.1, 1.5, "high"], "[0, 1]"),
    ("sd1.img2img", "strength", [0.1], "no step to run"),
    ("sd1.img2img", "image", [IMG * 3, torch.zeros(1, 4, 32, 32), "cat.png"], "image"),
    ("sd1.img2img", "image", [torch.full((1, 3, 30, 32), 0.5)], "multiple of 8"),
    ("sd1.img2img", "image", [torch.full((3, 3, 32, 32), 0.5)], "do not divide the batch"),
    ("sd1.inpaint", "mask", [MASK[..., :16, :], torch.zeros(1, 3, 32, 32), None], "mask"),
    ("sd3.txt2img", "sampler", ["ddim"], "choose one of flow_euler"),
    ("sd3.txt2img", "height", [42], "multiple of 4 (VAE downscale 2 x patch size 2)"),
    ("sd3.txt2img", "shift", [0, -1.0, "3"], "(0, inf)"),
    ("sd3.txt2img", "prompt_embeds", [torch.zeros(1, 8, 48)], "(context (B, tokens, width), pooled"),
    ("sd3.txt2img", "negative_prompt_embeds", [(torch.zeros(2, 8, 48), torch.zeros(2, 32))], "do not match"),
    ("sd3.txt2img", "max_sequence_length", [0, 513], "max_sequence_length"),
    ("sd3.img2img", "strength", [0.0, 2.0], "strength"),
    ("pixel.sample", "labels", [None], "class-conditional"),
    ("pixel.sample", "steps", [0, 1001, 2.5], "integer"),
    ("pixel.sample", "sampler", ["flow_euler"], "choose one of ddpm"),
    ("pixel.sample", "seed", [-1], "integer >= 0"),
    ("pixel.sample", "guidance", [-1, "strong"], "[0, inf)"),
    ("pixel.sample", "noise", [torch.zeros(2, 1, 8, 8)], "must have shape"),
    ("pixel.sample", "precision", ["fp16"], "choose one of fp32, bf16"),
]
ROWS = [(e, a, v, allowed) for e, a, values, allowed in BAD for v in values]


def _call(entry, kwargs, sd1, sd3, pixel):
    if entry in ("generate", "generate_sd"):
        return fastdiff.generate(**kwargs, **({"model": sd1} if entry == "generate_sd" and "model" not in kwargs
                                              else {}))
    if entry == "load_pipeline":
        return fastdiff.load_pipeline(**kwargs)
    family, method = entry.split(".")
    pipe = {"sd1": sd1, "sd3": sd3, "pixel": pixel}[family]
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _embeds(pipe)
    return getattr(pipe, method)(**kwargs)


@pytest.mark.parametrize("entry,argument,value,allowed", ROWS,
                         ids=[f"{e}-{a}={str(v)[:12]!s}" for e, a, v, _ in ROWS])
def test_bad_argument_is_one_line_before_anything_runs(sd1, sd3, pixel, tmp_path, monkeypatch, capfd, entry,
                                                       argument, value, allowed):
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1))
             for m in (sd1.unet, sd1.text_encoder, sd1.vae, sd3.transformer, sd3.vae, pixel.unet)]
    kwargs = {**GOOD[entry], argument: value}
    try:
        with pytest.raises(InvalidArgument) as err:
            _call(entry, kwargs, sd1, sd3, pixel)
    finally:
        for h in hooks:
            h.remove()
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
    assert len(msg.splitlines()) == 1, msg
    assert err.value.argument == argument and msg.startswith(f"{argument}: "), msg
    assert allowed in msg, msg
    assert calls == [], "a network ran before the argument was checked"
    assert capfd.readouterr().err == "", "something (a progress bar?) was printed before the check"
    assert list(tmp_path.iterdir()) == []


def test_good_calls_of_the_table_run(sd1, sd3, pixel, tmp_path, monkeypatch):
    """The table's good calls run, so each row's error comes from its one bad argument."""
    monkeypatch.chdir(tmp_path)
    for entry in ("sd1.txt2img", "sd1.img2img", "sd1.inpaint", "sd3.txt2img", "sd3.img2img", "pixel.sample"):
        out = _call(entry, dict(GOOD[entry]), sd1, sd3, pixel)
        assert out.dim() == 4 and out.min() >= 0 and out.max() <= 1, entry  # every pipeline returns [0, 1]
    assert len(_call("generate", dict(GOOD["generate"]), sd1, sd3, pixel)) == 1  # the bundled model
    assert len(_call("generate_sd", dict(GOOD["generate_sd"], height=32, width=32), sd1, sd3, pixel)) == 1
    assert list(tmp_path.iterdir()) == []
