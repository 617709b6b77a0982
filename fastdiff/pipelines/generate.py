"""``fastdiff.generate``: images from a model in one call (the bundled default model when none is given)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, PngImagePlugin

from fastdiff.pipelines.pixel import DEFAULT_STEPS, PixelPipeline, load_pixel_pipeline
from fastdiff.train.plots import image_grid, to_pil

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


def generate(prompt: str | None = None, *, model: str | os.PathLike | PixelPipeline | None = None,
             label: int | str | Sequence[int | str] | None = None, n: int = 16, seed: int = 0,
             sampler: str = "ddim", steps: int | None = None, guidance: float | str | None = "model",
             progress: bool = True) -> list[Image.Image]:
    """``n`` images as PIL images. The same arguments and seed give the same images.

    Pixel models (the bundled Fashion-MNIST model by default): ``label`` is a class name (``"sneaker"``) or
    index (``n`` images of it), or a list of them (one image each); ``None`` cycles through every class.
    ``guidance`` is the classifier-free guidance scale: ``"model"`` (default) uses the scale the model was
    measured best at (its folder's ``_fastdiff.default_guidance``); None or 1: off.
    """
    if prompt is not None:
        raise ValueError("this model is a class-conditional pixel model and takes no text prompt; use "
                         "label=... (text-to-image needs a Stable Diffusion checkpoint as model=...)")
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

