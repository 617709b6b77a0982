"""Real Fashion-MNIST for evaluation, in the diffusion model's own pixel space.

Every image the evaluation touches (real or generated) is a float tensor of shape (N, 1, 32, 32) in [-1, 1]:
the 28x28 Fashion-MNIST image padded with 2 px of background to 32x32 and scaled as ``x * 2/255 - 1``. The
real images come from the same loader the diffusion model trains on (:mod:`fastdiff.io.datasets`), so the
classifier sees generated samples exactly as the diffusion model produces them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastdiff import settings
from fastdiff.io import datasets as _datasets

__all__ = [
    "fashion_mnist_dir",
    "FASHION_CLASSES",
    "load_fashion_mnist",
    "to_model_space",
    "class_index",
    "load_image_set",
    "save_image_set",
]

FASHION_CLASSES = tuple(_datasets.FASHION_MNIST_CLASSES)


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST IDX folder: the ``fashion_mnist`` setting (``FASTDIFF_FASHION_MNIST``; default where
    Debian's ``dataset-fashion-mnist`` package installs it)."""
    return settings.current().fashion_mnist


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split: images (N, 1, 32, 32) float32 in [-1, 1], labels int64."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else fashion_mnist_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {root}. On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`, "
            "or set FASTDIFF_FASHION_MNIST (or --data) to the folder with the IDX files.")
    ds = _datasets.load_fashion_mnist(root, split, size=32, fit="pad")
    return ds.batch(torch.arange(len(ds)))


def to_model_space(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W) or (N, 1, H, W) in 0..255 -> float32 (N, 1, size, size) in [-1, 1], as the trainer sees them.

    A smaller image is padded with background (0 -> -1), not resized: 28x28 gets 2 px on each side.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images in 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) grayscale images, got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images are {h}x{w}, larger than the {size}x{size} model space")
    return _datasets.fit_images(images, size, "pad").float().mul_(2.0 / 255.0).sub_(1.0)


def class_index(name: str | int) -> int:
    """A Fashion-MNIST class by index (``7``, ``"7"``) or name (``"sneaker"``, ``"t-shirt"``, ``"ankle_boot"``)."""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        i = int(name)
        if not 0 <= i < len(FASHION_CLASSES):
            raise ValueError(f"class index {i} outside 0..{len(FASHION_CLASSES) - 1}")
        return i
    key = name.lower().replace("_", " ").replace("-", " ").strip()
    for i, cls in enumerate(FASHION_CLASSES):
        aliases = {cls.replace("-", " "), *(part.replace("-", " ") for part in cls.split("/")), cls.replace("/", " ")}
        if key in aliases:
            return i
    raise ValueError(f"unknown Fashion-MNIST class {name!r}; classes: {', '.join(FASHION_CLASSES)}")


def _array_to_model_space(arr: np.ndarray, what: str) -> torch.Tensor:
    if arr.ndim == 4 and arr.shape[-1] == 1:  # NHWC with one channel
        arr = arr[..., 0]
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected grayscale images (N, H, W), (N, 1, H, W) or (N, H, W, 1), got {arr.shape}")
    if arr.dtype == np.uint8:
        return to_model_space(torch.from_numpy(np.ascontiguousarray(arr)))
    if np.issubdtype(arr.dtype, np.floating):
        # Float images are taken to be in the model space [-1, 1] (what the samplers return).
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if x.numel() and (x.min() < -1.05 or x.max() > 1.05):
            raise ValueError(f"{what}: float images must be in [-1, 1], found [{x.min():.3f}, {x.max():.3f}]; "
                             "store uint8 0..255 instead")
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"{what}: float images must be 32x32, got {tuple(x.shape[-2:])}")
        return x[:, None].clamp(-1, 1)
    raise ValueError(f"{what}: unsupported dtype {arr.dtype} (use uint8 0..255 or float in [-1, 1])")


def load_image_set(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (+ labels if known) from an ``.npz`` or a folder, as (N, 1, 32, 32) in [-1, 1].

    - ``.npz``: ``images`` (uint8 0..255 or float in [-1, 1]; 28x28 is padded to 32x32) and optionally
      ``labels`` (class indices). ``x``/``y`` are accepted as the names too.
    - folder: one subfolder per class (named by index ``0``..``9`` or class name) holding PNG/JPEG files; or
      image files directly in the folder (no labels).
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image set: {path}")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: expected an .npz file or a folder of images")
        with np.load(path) as z:
            key_x = next((k for k in ("images", "x") if k in z), None)
            if key_x is None:
                raise ValueError(f"{path}: no 'images' array (found {', '.join(z.files)})")
            images = _array_to_model_space(z[key_x], str(path))
            key_y = next((k for k in ("labels", "y") if k in z), None)
            labels = None if key_y is None else torch.from_numpy(z[key_y].astype(np.int64).reshape(-1))
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_CLASSES)):
            raise ValueError(f"{path}: labels must be in 0..{len(FASHION_CLASSES) - 1}")
        return images, labels
    exts = {".png", ".jpg", ".jpeg", ".bmp"}

    def read(files):
        arrs = []
        for f in files:
            a = np.asarray(Image.open(f).convert("L"))
            if arrs and a.shape != arrs[0].shape:
                raise ValueError(f"{f}: size {a.shape} differs from {arrs[0].shape} of the other images")
            arrs.append(a)
        return np.stack(arrs)

    subdirs = sorted(d for d in path.iterdir() if d.is_dir())
    if subdirs:
        xs, ys = [], []
        for d in subdirs:
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in exts)
            if files:
                xs.append(read(files))
                ys += [class_index(d.name)] * len(files)
        if not xs:
            raise ValueError(f"{path}: no images in its class subfolders")
        return _array_to_model_space(np.concatenate(xs), str(path)), torch.tensor(ys, dtype=torch.long)
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in exts)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(sorted(exts))}) found")
    return _array_to_model_space(read(files), str(path)), None


def save_image_set(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write model-space images as uint8 (rounded like a PNG) to an ``.npz`` that :func:`load_image_set` reads."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()
    arrays = {"images": x}
    if labels is not None:
        arrays["labels"] = torch.as_tensor(labels).cpu().numpy().astype(np.int64)
    np.savez_compressed(path, **arrays)
