"""``fastdiff.generate``: images from a model in one call (the bundled default model when none is given)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, PngImagePlugin

from fastdiff.pipelines.pixel import DEFAULT_STEPS, PixelPipeline, load_pixel_pipeline
from fastdiff.io.images import image_grid, to_pil

__all__ = ["generate", "class_grid", "save_png", "progress_callback"]


def progress_callback(total: int, desc: str = "sampling", enabled: bool = True):
    """A sampler callback driving a tqdm bar over the steps, and the bar (close it when done)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)

    def cb(i: int, t: float, x: torch.Tensor) -> None:
        bar.update(1)

    return cb, bar


def _pipeline(model) -> PixelPipeline:
    if isinstance(model, PixelPipeline):
        return model
    return load_pixel_pipeline(model)


def generate(prompt: str | None = None, *, model=None,
             label: int | str | Sequence[int | str] | None = None, n: int | None = None, seed: int = 0,
             sampler: str | None = None, steps: int | None = None, guidance: float | str | None = "model",
             progress: bool = True, negative_prompt: str | None = None, height: int = 512, width: int = 512,
             init_image=None, strength: float = 0.8, mask=None) -> list[Image.Image]:
    """``n`` images as PIL images. The same arguments and seed give the same images.

    Pixel models (the bundled Fashion-MNIST model by default): ``label`` is a class name (``"sneaker"``) or
    index (``n`` images of it), or a list of them (one image each); ``None`` cycles through every class.
    ``guidance`` is the classifier-free guidance scale: ``"model"`` (default) uses the scale the model was
    measured best at (its folder's ``_fastdiff.default_guidance``); None or 1: off.

    Stable Diffusion (``model`` = a diffusers folder or an original single file): ``prompt`` gives text-to-image
    (``height`` x ``width``, ``n`` images per prompt, default 1, ``negative_prompt``); with ``init_image`` (a
    path or PIL image) img2img at ``strength``; with ``mask`` as well (white = repaint) inpainting (SD1).
    Defaults per family: SD1 euler, 30 steps, guidance 7.5; SD3 flow_euler, 28 steps, guidance 7.0.
    """
    if prompt is not None or init_image is not None or mask is not None:
        return _generate_sd(prompt, model=model, n=n or 1, seed=seed, sampler=sampler, steps=steps,
                            guidance=guidance, progress=progress, negative_prompt=negative_prompt, height=height,
                            width=width, init_image=init_image, strength=strength, mask=mask)
    n = 16 if n is None else n
    sampler = sampler or "ddim"
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pipe = _pipeline(model)
    names = pipe.class_names
    if not names:
        labels = None
    elif label is None:
        labels = [i % len(names) for i in range(n)]
    elif isinstance(label, (list, tuple)):
        labels = [pipe.label_index(lab) for lab in label]  # one image per listed label; n is not used
    else:
        labels = [pipe.label_index(label)] * n
    steps = steps or DEFAULT_STEPS.get(sampler, 50)
    cb, bar = progress_callback(steps, enabled=progress)
    try:
        x = pipe.sample(labels, n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance, callback=cb)
    finally:
        bar.close()
    return to_pil(x)


def _open_image(img, what: str, mode: str):
    """A PIL image from a path or a PIL image (tensors pass through); errors name the unreadable file."""
    if img is None or isinstance(img, (Image.Image, torch.Tensor)):
        return img
    try:
        with Image.open(img) as im:
            return im.convert(mode)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {img}: cannot be read as an image ({e})") from None


def _generate_sd(prompt, *, model, n, seed, sampler, steps, guidance, progress, negative_prompt, height, width,
                 init_image, strength, mask) -> list[Image.Image]:
    """Text-to-image / img2img / inpainting with a Stable Diffusion checkpoint (see :func:`generate`)."""
    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.pipelines.sd1 import StableDiffusion1
    from fastdiff.pipelines.sd3 import StableDiffusion3

    if prompt is None:
        raise ValueError("init_image / mask need a text prompt (prompt=...)")
    if model is None:
        raise ValueError("a text prompt needs a Stable Diffusion checkpoint: model=PATH (a diffusers folder or an "
                         "original .safetensors / .ckpt file); the bundled model is class-conditional (label=...)")
    pipe = model if isinstance(model, (StableDiffusion1, StableDiffusion3, PixelPipeline)) else load_pipeline(model)
    if not isinstance(pipe, (StableDiffusion1, StableDiffusion3)):
        raise ValueError(f"{getattr(pipe, 'source', model)} is a class-conditional pixel model and takes no text "
                         "prompt; use label=...")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sd3 = isinstance(pipe, StableDiffusion3)
    sampler, steps, default_guidance = sd_defaults(pipe, sampler, steps)
    guidance = default_guidance if guidance == "model" else (1.0 if guidance is None else guidance)
    image = _open_image(init_image, "init_image", "RGB")
    m = _open_image(mask, "mask", "L")
    if sd3 and m is not None:
        raise ValueError("inpainting (mask=...) is implemented for Stable Diffusion 1.x checkpoints; this is an SD3 "
                         "model: use init_image + strength (img2img) or txt2img")
    cb, bar = progress_callback(steps, enabled=progress)
    kw = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
              num_images_per_prompt=n, callback=cb)
    try:
        if m is not None:
            if image is None:
                raise ValueError("mask needs init_image, the picture to repaint")
            x = pipe.inpaint(prompt, image, m, **kw)
        elif image is not None:
            x = pipe.img2img(prompt, image, strength=strength, **kw)
        else:
            x = pipe.txt2img(prompt, height=height, width=width, **kw)
    finally:
        bar.close()
    return to_pil(x * 2 - 1)


def sd_defaults(pipe, sampler: str | None, steps: int | None) -> tuple[str, int, float]:
    """(sampler, steps, guidance) a Stable Diffusion pipeline uses when not told: SD1 euler / 30 / 7.5,
    SD3 flow_euler / 28 / 7.0 (the settings of diffusers' pipelines and the model cards)."""
    from fastdiff.pipelines.sd3 import StableDiffusion3

    if isinstance(pipe, StableDiffusion3):
        return sampler or "flow_euler", steps or 28, 7.0
    return sampler or "euler", steps or 30, 7.5


def class_grid(pipe: PixelPipeline, *, per_class: int = 4, seed: int = 0, sampler: str = "ddim",
               steps: int | None = None, guidance: float | str | None = "model", progress: bool = True) -> Image.Image:
    """One labelled row per class, ``per_class`` samples each, all in one batched sampling run."""
    names = pipe.class_names
    if not names:
        raise ValueError("class_grid needs a class-conditional model")
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    steps = steps or DEFAULT_STEPS.get(sampler, 50)
    cb, bar = progress_callback(steps, enabled=progress)
    try:
        x = pipe.sample(labels, seed=seed, sampler=sampler, steps=steps, guidance=guidance, callback=cb)
    finally:
        bar.close()
    return image_grid(to_pil(x), per_class, row_labels=names)


def save_png(img: Image.Image, path: str | os.PathLike, info: dict) -> None:
    """Save with the generation settings in PNG text chunks (readable with ``Image.open(p).text``)."""
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(f"fastdiff:{k}", str(v))
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp, format="PNG", pnginfo=meta)
    os.replace(tmp, path)

