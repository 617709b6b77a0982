"""A folder of images with captions, the data of LoRA and ControlNet fine-tuning.

Two layouts are read (diffusers' ``imagefolder`` conventions):

- ``metadata.jsonl``: one JSON object a line with ``file_name`` (a path relative to the folder) and ``text``
  (the caption); when the file exists it alone says which images belong to the set;
- otherwise every image (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) with a caption file of the same
  stem beside it (``cat.png`` + ``cat.txt``). An image without its caption is an error that names it.

Images are converted to RGB (or to grayscale for a 1-channel model), resized so the shorter side is ``size`` (bicubic) and centre-cropped to
``size x size``, as diffusers' fine-tuning scripts do; they are kept as uint8 in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.io.datasets import DatasetError

__all__ = ["CaptionedImages", "load_captioned_folder", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class CaptionedImages:
    """Images (N, C, size, size) uint8 (C = 3, RGB, or 1, grayscale) and one caption each."""

    images: torch.Tensor
    captions: list[str]
    files: list[str]
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise DatasetError(f"{self.name}: images must be uint8 (N, 3 or 1, H, W), got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if len(self.captions) != self.images.shape[0] or len(self.files) != self.images.shape[0]:
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but {len(self.captions)} captions")
        if self.images.shape[0] == 0:
            raise DatasetError(f"{self.name}: the folder holds no images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Float32 images in [-1, 1] at the indices ``idx``."""
        return self.images[idx].float().mul_(2.0 / 255.0).sub_(1.0)

    def text(self, idx: torch.Tensor) -> list[str]:
        return [self.captions[i] for i in idx.tolist()]


def _read_metadata(root: Path) -> list[tuple[Path, str]]:
    path = root / "metadata.jsonl"
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str) \
                or not isinstance(obj.get("text"), str):
            raise DatasetError(f"{path}:{n}: each line needs a \"file_name\" and a \"text\" string, got {line[:200]!r}")
        image = root / obj["file_name"]
        if not image.is_file():
            raise DatasetError(f"{path}:{n}: image {obj['file_name']!r} does not exist in {root}")
        rows.append((image, obj["text"]))
    return rows


def _read_pairs(root: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"{root}: no caption file (same name, .txt) for {shown}; or give a metadata.jsonl")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def _fit(img, size: int, channels: int) -> np.ndarray:
    """RGB / gray, shorter side resized to ``size`` (bicubic), centre crop -> uint8 (channels, size, size)."""
    from PIL import Image

    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.uint8)
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def load_captioned_folder(root: str | os.PathLike, *, size: int, channels: int = 3) -> CaptionedImages:
    """Read a captioned image folder (see the module docstring) at ``size x size`` pixels, ``channels`` 3 (RGB)
    or 1 (grayscale)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data: {root} is not a folder of images with captions")
    if not isinstance(size, int) or size < 8:
        raise DatasetError(f"size must be an integer >= 8, got {size!r}")
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 3 (RGB) or 1 (grayscale), got {channels!r}")
    rows = _read_metadata(root) if (root / "metadata.jsonl").is_file() else _read_pairs(root)
    if not rows:
        raise DatasetError(f"{root}: no images (.png, .jpg, .jpeg, .webp, .bmp) with captions found")
    arrays = []
    for path, _ in rows:
        try:
            with Image.open(path) as im:
                arrays.append(_fit(im, size, channels))
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{path}: not a readable image ({e})") from None
    images = torch.from_numpy(np.stack(arrays))
    return CaptionedImages(images, [t for _, t in rows], [str(p.relative_to(root)) for p, _ in rows],
                           name=str(root))
