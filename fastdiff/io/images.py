"""Images in and out: tensors in [-1, 1] -> PIL images, labelled grids, PNGs written atomically (Pillow only)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["to_pil", "image_grid", "save_png_atomic"]


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], (N, C, H, W) with C = 1 or 3 -> list of PIL images (L or RGB)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for im in a:
        if im.shape[0] == 1:
            out.append(Image.fromarray(im[0].numpy(), "L"))
        else:
            out.append(Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB"))
    return out


def image_grid(images: Sequence[Image.Image], cols: int, *, row_labels: Sequence[str] | None = None,
               scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile images row by row (``cols`` per row), upscaled ``scale``x (nearest), with optional row labels."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = math.ceil(len(images) / cols)
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(s, font=font)) for s in row_labels) + 8
    grid = Image.new("RGB", (label_w + cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, s in enumerate(row_labels or ()):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), s, fill=(0, 0, 0), font=font)
    return grid


def save_png_atomic(img: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG through a temporary file + os.replace, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
