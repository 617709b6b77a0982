"""``fastdiff.generate``: images from a model in one call (the bundled default model when none is given)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, PngImagePlugin

from fastdiff._argtypes import (InvalidArgument, check_choice, check_int, check_multiple, check_number, check_quantize,
                                check_type)
from fastdiff.io.images import image_grid, to_pil
from fastdiff.pipelines.core import LatentPipeline
from fastdiff.pipelines.pixel import TEXT_TO_IMAGE_MODELS, PixelPipeline, load_pixel_pipeline

__all__ = ["generate", "class_grid", "save_png", "progress_callback", "InvalidArgument"]


class _Progress:
    """A sampler callback driving a tqdm bar over the steps. The bar opens at the first step, so an argument
    error raised before sampling starts shows no bar."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None

    def __call__(self, i: int, t: float, x: torch.Tensor) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="step", disable=not self.enabled, leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_callback(total: int, desc: str = "sampling", enabled: bool = True):
    """A sampler callback driving a tqdm bar over the steps (opened at the first step), and the bar (close it
    when done)."""
    p = _Progress(total, desc, enabled)
    return p, p


def _pipeline(model) -> PixelPipeline:
    if isinstance(model, PixelPipeline):
        return model
    return load_pixel_pipeline(model)


def _check_arguments(prompt, model, label, n, seed, sampler, steps, guidance, progress, negative_prompt, height,
                     width, init_image, strength, mask, quantize=None, sketch=None) -> None:
    """The checks of :func:`generate` that need no model: one line naming the argument, before anything loads."""
    from fastdiff.samplers import SAMPLERS

    check_type("prompt", prompt, str, "a string")
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list, tuple)):
        raise InvalidArgument("negative_prompt", f"must be a string, a list of strings or None, got "
                                                 f"{type(negative_prompt).__name__}")
    if model is not None and not isinstance(model, (str, os.PathLike)) and not hasattr(model, "decode_latents"):
        raise InvalidArgument("model", f"must be a path, a loaded pipeline or None, got {type(model).__name__}")
    if isinstance(label, bool) or (label is not None and not isinstance(label, (int, str, list, tuple))):
        raise InvalidArgument("label", f"must be a class name or index, a list of them, or None, got {label!r}")
    for name, v, low in (("n", n, 1), ("seed", seed, 0), ("steps", steps, 1)):
        if v is not None:
            check_int(name, v, low)
    if sampler is not None:
        check_choice("sampler", sampler, SAMPLERS)
    if guidance is not None and guidance != "model":
        check_number("guidance", guidance, 0.0)
    check_type("progress", progress, bool, "True or False")
    for name, v in (("height", height), ("width", width)):
        if v is not None:
            check_multiple(name, v, 8, 8)
    if strength is not None:
        check_number("strength", strength, 0.0, 1.0)
    for name, v in (("init_image", init_image), ("mask", mask)):
        if v is not None and not isinstance(v, (str, os.PathLike, Image.Image, torch.Tensor)):
            raise InvalidArgument(name, f"must be a path, a PIL image or a tensor, got {type(v).__name__}")
    if mask is not None and init_image is None:
        raise InvalidArgument("mask", "needs init_image, the picture to repaint")
    if quantize is not None:
        check_quantize("quantize", quantize)
    if sketch is not None:
        if not isinstance(sketch, (str, os.PathLike, Image.Image, torch.Tensor)) and \
                type(sketch).__module__ != "numpy":
            raise InvalidArgument("sketch", f"must be an edge map (fastdiff.sketch(image)): a tensor, numpy array, "
                                            f"PIL image or image path, got {type(sketch).__name__}")
        if prompt is not None or init_image is not None:
            raise InvalidArgument("sketch", "goes with a sketch-conditioned pixel model (model='fashion-sketch' or a "
                                            "sketch run), not with a prompt or init_image")
    elif model in TEXT_TO_IMAGE_MODELS and prompt is None:
        raise InvalidArgument("prompt", f"{model} is a text-to-image model: give prompt=..., e.g. \"a photo of a "
                                        "sneaker\"")
    elif model == "fashion-sketch":
        raise InvalidArgument("sketch", "the fashion-sketch model draws garments along a sketch: give "
                                        "sketch=fastdiff.sketch(image) (edges 1 on 0), a PIL edge image or its path")


def generate(prompt: str | None = None, *, model=None,
             label: int | str | Sequence[int | str] | None = None, n: int | None = None, seed: int = 0,
             sampler: str | None = None, steps: int | None = None, guidance: float | str | None = "model",
             progress: bool = True, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, init_image=None, strength: float | None = None,
             mask=None, quantize: str | None = None, sketch=None) -> list[Image.Image]:
    """``n`` images as PIL images. The same arguments and seed give the same images. Every argument is checked
    before a model loads or a step runs; an error is one line naming the argument (:class:`InvalidArgument`,
    a ValueError and TypeError).

    Pixel models (the bundled Fashion-MNIST model by default): ``label`` is a class name (``"sneaker"``) or
    index (``n`` images of it), or a list of them (one image each); ``None`` cycles through every class.
    ``guidance`` is the classifier-free guidance scale: ``"model"`` (default) uses the scale the model was
    measured best at (its folder's ``_fastdiff.default_guidance``); None or 1: off.

    Stable Diffusion (``model`` = a diffusers folder or an original single file): ``prompt`` gives text-to-image
    (``height`` x ``width``, ``n`` images per prompt, default 1, ``negative_prompt``); with ``init_image`` (a
    path or PIL image) img2img at ``strength``; with ``mask`` as well (white = repaint) inpainting (SD1).
    What is not given comes from the family's defaults (``fastdiff.pipelines.sd1.DEFAULTS``, ``sd3.DEFAULTS``:
    sampler, steps, guidance, size, strength).

    ``quantize="int8"`` runs the denoiser's convolutions and linears in int8 (``pipe.quantize``; a pipeline given
    as ``model`` is quantised in place).

    Sketch-to-image (``model="fashion-sketch"``, or the run folder / exported folder of a ``conditioning="sketch"``
    run): ``sketch`` is the edge map the garments follow, as ``fastdiff.sketch(image)`` returns it (edges 1 on 0;
    a PIL image, numpy array, tensor (H, W), (1, H, W) or (B, 1, H, W), or an image path), square, resized to the
    model's size when it differs; ``n`` images of one sketch (default 16), or one per sketch of a batch.
    ``guidance`` contrasts the sketch with the model's dropped (empty) condition.
    """
    _check_arguments(prompt, model, label, n, seed, sampler, steps, guidance, progress, negative_prompt, height,
                     width, init_image, strength, mask, quantize, sketch)
    if prompt is not None or init_image is not None or mask is not None:
        return _generate_sd(prompt, model=model, n=n or 1, seed=seed, sampler=sampler, steps=steps,
                            guidance=guidance, progress=progress, negative_prompt=negative_prompt, height=height,
                            width=width, init_image=init_image, strength=strength, mask=mask, quantize=quantize)
    pipe = _pipeline(model)
    if quantize is not None:
        pipe.quantize(quantize)
    if sketch is not None or pipe.condition is not None:
        return _generate_sketch(pipe, sketch, label=label, n=n, seed=seed, sampler=sampler, steps=steps,
                                guidance=guidance, progress=progress)
    n = 16 if n is None else n
    sampler = sampler or pipe.defaults.sampler
    names = pipe.class_names
    if not names:
        labels = None
    elif label is None:
        labels = [i % len(names) for i in range(n)]
    elif isinstance(label, (list, tuple)):
        labels = [pipe.label_index(lab) for lab in label]  # one image per listed label; n is not used
    else:
        labels = [pipe.label_index(label)] * n
    return to_pil(_sample(pipe, labels, progress, n=n, seed=seed, sampler=sampler, steps=steps,
                          guidance=guidance) * 2 - 1)


def _generate_sketch(pipe: PixelPipeline, sketch, *, label, n, seed, sampler, steps, guidance,
                     progress) -> list[Image.Image]:
    """:func:`generate` with a sketch-conditioned pixel model: ``n`` images following ``sketch``."""
    if pipe.condition_argument != "sketch":
        what = "takes no sketch" if pipe.condition is None else f"is {pipe.condition['kind']}-conditioned"
        raise InvalidArgument("sketch", f"model {pipe.source or 'given'} {what}; use a sketch-conditioned model "
                                        "(model='fashion-sketch' or a conditioning='sketch' run)")
    if sketch is None:
        raise InvalidArgument("sketch", "this model is sketch-conditioned: give sketch=fastdiff.sketch(image) (edges 1 "
                                        "on 0), a PIL edge image or its path")
    s = torch.from_numpy(sketch.copy()) if type(sketch).__module__ == "numpy" else _open_image(sketch, "sketch", "L")
    batch = s.shape[0] if isinstance(s, torch.Tensor) and s.dim() == 4 else 1
    if batch > 1 and n is not None and n != batch:
        raise InvalidArgument("n", f"{n} images for a batch of {batch} sketches: one image per sketch (n={batch} or "
                                   "None)")
    n = batch if batch > 1 else (16 if n is None else n)
    labels = None
    if pipe.class_names:
        if label is None:
            labels = [i % len(pipe.class_names) for i in range(n)]
        elif isinstance(label, (list, tuple)):
            labels = [pipe.label_index(lab) for lab in label]
            if len(labels) != n:
                raise InvalidArgument("label", f"{len(labels)} labels for {n} images")
        else:
            labels = [pipe.label_index(label)] * n
    elif label is not None:
        raise InvalidArgument("label", "this sketch model takes no class label")
    sampler = sampler or pipe.defaults.sampler
    x = _sample(pipe, labels, progress, n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                condition=s)
    return to_pil(x * 2 - 1)


def _sample(pipe: PixelPipeline, labels, progress: bool, *, sampler: str, steps: int | None, **kw) -> torch.Tensor:
    """``pipe.sample`` with a progress bar over its steps."""
    steps = pipe.resolve_steps(sampler, steps)
    cb, bar = progress_callback(steps, enabled=progress)
    try:
        return pipe.sample(labels, sampler=sampler, steps=steps, callback=cb, **kw)
    finally:
        bar.close()


def _open_image(img, what: str, mode: str):
    """A PIL image from a path or a PIL image (tensors pass through); errors name the unreadable file."""
    if img is None or isinstance(img, (Image.Image, torch.Tensor)):
        return img
    try:
        with Image.open(img) as im:
            return im.convert(mode)
    except (OSError, ValueError) as e:
        raise InvalidArgument(what, f"{img}: cannot be read as an image ({e})") from None


def _generate_sd(prompt, *, model, n, seed, sampler, steps, guidance, progress, negative_prompt, height, width,
                 init_image, strength, mask, quantize=None) -> list[Image.Image]:
    """Text-to-image / img2img / inpainting with a Stable Diffusion checkpoint (see :func:`generate`)."""
    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.pipelines.sd3 import StableDiffusion3

    if prompt is None:
        raise InvalidArgument("prompt", "init_image / mask need a text prompt (prompt=...)")
    if model is None:
        raise InvalidArgument("model", "a text prompt needs a text-to-image model: model='fashion-tiny-sd' (bundled) "
                                       "or a Stable Diffusion checkpoint (a diffusers folder or an original "
                                       ".safetensors / .ckpt file); the default model is class-conditional (label=...)")
    pipe = model if hasattr(model, "decode_latents") else load_pipeline(model)
    if not isinstance(pipe, LatentPipeline):
        raise InvalidArgument("model", f"{getattr(pipe, 'source', model)} is a class-conditional pixel model and "
                                       "takes no text prompt; use label=...")
    if quantize is not None:
        pipe.quantize(quantize)
    if isinstance(pipe, StableDiffusion3) and mask is not None:
        raise InvalidArgument("mask", "inpainting (mask=...) is implemented for Stable Diffusion 1.x checkpoints; "
                                      "this is an SD3 model: use init_image + strength (img2img) or txt2img")
    sampler, steps, default_guidance = sd_defaults(pipe, sampler, steps)
    guidance = default_guidance if guidance == "model" else (1.0 if guidance is None else guidance)
    d = pipe.defaults
    image = _open_image(init_image, "init_image", "RGB")
    m = _open_image(mask, "mask", "L")
    cb, bar = progress_callback(steps, enabled=progress)
    kw = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
              num_images_per_prompt=n, callback=cb)
    try:
        if m is not None:
            x = pipe.inpaint(prompt, image, m, **kw)
        elif image is not None:
            x = pipe.img2img(prompt, image, strength=d.strength if strength is None else strength, **kw)
        else:
            x = pipe.txt2img(prompt, height=height or d.height, width=width or d.width, **kw)
    finally:
        bar.close()
    return to_pil(x * 2 - 1)


def sd_defaults(pipe, sampler: str | None, steps: int | None) -> tuple[str, int, float]:
    """(sampler, steps, guidance) a Stable Diffusion pipeline uses when not told: its family's ``defaults``."""
    d = pipe.defaults
    return sampler or d.sampler, steps or d.steps, d.guidance


def class_grid(pipe: PixelPipeline, *, per_class: int = 4, seed: int = 0, sampler: str = "ddim",
               steps: int | None = None, guidance: float | str | None = "model", progress: bool = True) -> Image.Image:
    """One labelled row per class, ``per_class`` samples each, all in one batched sampling run."""
    names = pipe.class_names
    if not names:
        raise ValueError("class_grid needs a class-conditional model")
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    x = _sample(pipe, labels, progress, seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    return image_grid(to_pil(x * 2 - 1), per_class, row_labels=names)


def save_png(img: Image.Image, path: str | os.PathLike, info: dict) -> None:
    """Save with the generation settings in PNG text chunks (readable with ``Image.open(p).text``)."""
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(f"fastdiff:{k}", str(v))
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp, format="PNG", pnginfo=meta)
    os.replace(tmp, path)

