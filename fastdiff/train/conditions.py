"""Image conditioning: a condition image concatenated to the UNet's input channels.

``TrainConfig.conditioning`` takes, besides ``class`` and ``text``:

- ``sketch``: sketch-to-image. The condition of each training image is its edge map, ``fastdiff.sketch(image)``
  (Canny, see :mod:`fastdiff.sketch`; the thresholds are stored in the run's architecture so a pipeline
  reproduces them). The maps are computed once for the dataset and cached in the run folder
  (``conditions.safetensors``, with the SHA-256 of the images they came from); they are deterministic.
- ``sketch+class``: the same, and the class label through the UNet's class embedding.
- ``segmentation``: the network generates the MASK of a scene conditioned on its IMAGE (MedSegDiff, Wu et al.
  2023, without its feature-frequency parser: the image enters as extra input channels). The data is the
  synthetic shapes set below (:func:`shapes_dataset`); dataset spec ``shapes`` (10,000 scenes), ``shapes:N`` or
  ``shapes:N:SEED``.

The network is a plain :class:`~fastdiff.models.unet2d.UNet2D` with ``in_channels = C + Cc`` (the noisy sample's
C channels, then the condition's Cc) and ``out_channels = C``: its weights and ``UNet2DModel`` folder are those
of any other UNet2D (diffusers' inpainting UNets concatenate their mask the same way). Condition values enter the
network in [-1, 1] (edges / shapes 1, background -1); a dropped condition (classifier-free guidance, probability
``class_dropout``, drawn with the label dropout) is all zeros, a value no real condition image has everywhere.
Guided sampling is one batched forward of ``[x, zeros]`` and ``[x, condition]``.

Shapes set (the documented synthetic stand-in for a segmentation set, which cannot be downloaded here): each
scene is ``skimage.draw.random_shapes`` on a white S x S canvas, 1-3 shapes (rectangles, circles, triangles,
ellipses) of 1/5 to 1/2 of the side, grey levels 0..200, overlaps allowed; the mask is every pixel a shape covers
(the canvas stays 255 elsewhere). Gaussian noise (std 0.15 of the range, clipped) is added to the image, so the
mask is not a threshold of the pixel values. Scene ``i`` of split ``s`` is drawn from
``numpy.random.default_rng((seed, s, i))`` (train s = 0, test s = 1): the same spec gives the same scenes on
every machine and the splits never share a scene.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastdiff.io.datasets import DatasetError, ImageDataset, load_dataset
from fastdiff.sketch import sketch as edge_sketch

__all__ = ["IMAGE_CONDITIONINGS", "SKETCH_PARAMS", "CACHE_FILE", "ConditionedData", "shapes_dataset",
           "parse_shapes_spec", "sketch_maps", "prepare_conditions", "unet_arch", "condition_input"]

IMAGE_CONDITIONINGS = ("sketch", "sketch+class", "segmentation")
# fastdiff.sketch's thresholds used for the training maps (its defaults, suited to 28-32 px images)
SKETCH_PARAMS = {"high": 0.3, "low": 0.15, "sigma": 0.0, "thin": True}
CACHE_FILE = "conditions.safetensors"
SHAPES_DEFAULT_N = 10_000
SHAPES_NOISE = 0.15


@dataclass
class ConditionedData:
    """What the network generates (``targets``: an ImageDataset, uint8, with labels) and, index by index, the
    condition images (uint8 (N, Cc, H, W), 0..255)."""

    targets: ImageDataset
    conditions: torch.Tensor
    kind: str

    def __post_init__(self):
        if self.conditions.dtype != torch.uint8 or self.conditions.shape[0] != len(self.targets) \
                or self.conditions.shape[2:] != self.targets.images.shape[2:]:
            raise DatasetError(f"{self.targets.name}: conditions {self.conditions.dtype} "
                               f"{tuple(self.conditions.shape)} do not match the images "
                               f"{tuple(self.targets.images.shape)}")

    def condition(self, idx: torch.Tensor) -> torch.Tensor:
        """Float32 condition images in [-1, 1] at the indices ``idx``."""
        return self.conditions[idx].float().mul_(2.0 / 255.0).sub_(1.0)


# -------------------------------------------------------------------------------------------------------------
# The shapes set (segmentation)
# -------------------------------------------------------------------------------------------------------------

def _scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from skimage.draw import random_shapes

    img, _ = random_shapes((size, size), max_shapes=3, min_shapes=1, min_size=max(2, size // 5),
                           max_size=max(3, size // 2), channel_axis=None, intensity_range=(0, 200),
                           allow_overlap=True, rng=rng)
    mask = img != 255
    noisy = img.astype(np.float64) + rng.normal(0.0, SHAPES_NOISE * 255.0, img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mask


def shapes_dataset(n: int = SHAPES_DEFAULT_N, *, size: int = 32, seed: int = 0,
                   split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes of the shapes set: (images, masks), uint8 (n, 1, size, size); masks 255 on shapes, 0 off
    (see the module doc for how scene ``i`` is drawn)."""
    if split not in ("train", "test"):
        raise DatasetError(f"shapes: split must be 'train' or 'test', got {split!r}")
    if not isinstance(n, int) or n < 1 or not isinstance(size, int) or size < 8:
        raise DatasetError(f"shapes: need n >= 1 scenes of size >= 8, got n={n!r}, size={size!r}")
    s = 0 if split == "train" else 1
    images, masks = np.empty((n, 1, size, size), np.uint8), np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        img, m = _scene(size, np.random.default_rng((seed, s, i)))
        images[i, 0], masks[i, 0] = img, m.astype(np.uint8) * 255
    return torch.from_numpy(images), torch.from_numpy(masks)


def parse_shapes_spec(spec: str) -> tuple[int, int] | None:
    """``shapes`` / ``shapes:N`` / ``shapes:N:SEED`` -> (N, SEED); None for any other dataset spec."""
    kind, *rest = spec.split(":")
    if kind != "shapes":
        return None
    try:
        n = int(rest[0]) if rest and rest[0] else SHAPES_DEFAULT_N
        seed = int(rest[1]) if len(rest) > 1 else 0
    except ValueError:
        n = seed = -1
    if len(rest) > 2 or n < 1 or seed < 0:
        raise DatasetError(f"dataset {spec!r}: the shapes set is 'shapes', 'shapes:N' or 'shapes:N:SEED' "
                           "(N >= 1 scenes, SEED >= 0)")
    return n, seed


# -------------------------------------------------------------------------------------------------------------
# Sketch maps, cached
# -------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sketch_maps(images: torch.Tensor, *, chunk: int = 2048) -> torch.Tensor:
    """Edge maps of uint8 images (N, C, H, W) as uint8 (N, 1, H, W), 255 on edges: ``fastdiff.sketch`` with
    :data:`SKETCH_PARAMS`, in chunks (the result of an image does not depend on its chunk)."""
    out = [edge_sketch(images[s:s + chunk], **SKETCH_PARAMS).mul_(255).to(torch.uint8)
           for s in range(0, images.shape[0], chunk)]
    return torch.cat(out)


def _fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _cached_sketches(images: ImageDataset, run_dir: Path) -> torch.Tensor:
    path = run_dir / CACHE_FILE
    digest = _fingerprint(images.images)
    if path.is_file():
        try:
            saved = load_file(str(path))
            meta = saved["fingerprint"].numpy().tobytes().decode()
            if meta == digest + repr(sorted(SKETCH_PARAMS.items())):
                return saved["conditions"]
        except (OSError, KeyError, ValueError, UnicodeDecodeError):
            pass  # unreadable or made from other images: computed again below
    maps = sketch_maps(images.images)
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = torch.frombuffer(bytearray((digest + repr(sorted(SKETCH_PARAMS.items()))).encode()), dtype=torch.uint8)
    tmp = run_dir / f".{CACHE_FILE}.tmp"
    save_file({"conditions": maps, "fingerprint": tag.clone()}, str(tmp))
    tmp.replace(path)
    return maps


def prepare_conditions(cfg, dataset, run_dir: str | Path) -> ConditionedData:
    """The data of an image-conditioned run (``cfg``: its TrainConfig). ``dataset``: None (read from
    ``cfg.dataset``), an ImageDataset (sketch runs: the images to draw) or a ConditionedData (used as is)."""
    run_dir = Path(run_dir)
    if isinstance(dataset, ConditionedData):
        return dataset
    if cfg.conditioning == "segmentation":
        if dataset is not None:
            raise DatasetError("a segmentation run takes dataset=ConditionedData(masks, images, 'segmentation') "
                               "or None (the shapes set named by the dataset spec)")
        spec = parse_shapes_spec(cfg.dataset)
        if spec is None:
            raise DatasetError(f"conditioning segmentation trains on the synthetic shapes set: dataset must be "
                               f"'shapes', 'shapes:N' or 'shapes:N:SEED', got {cfg.dataset!r}")
        images, masks = shapes_dataset(spec[0], size=cfg.image_size, seed=spec[1])
        targets = ImageDataset(masks, torch.zeros(len(masks), dtype=torch.int64), ("scene",),
                               f"shapes:{spec[0]}:{spec[1]}")
        return ConditionedData(targets, images, "segmentation")
    images = dataset if dataset is not None else load_dataset(cfg.dataset, "train", size=cfg.image_size)
    if images.image_shape[1:] != (cfg.image_size, cfg.image_size):  # before any map is drawn or cached
        raise ValueError(f"dataset {images.name!r} has images of {images.image_shape[1:]} pixels but the "
                         f"configuration wants {cfg.image_size}x{cfg.image_size} (image_size)")
    return ConditionedData(images, _cached_sketches(images, run_dir), "sketch")


def unet_arch(cfg, data: ConditionedData) -> dict:
    """The architecture record of a new image-conditioned run: ``unet`` (a UNet2DConfig dict with the condition's
    input channels) and ``condition`` (what the pipeline needs to rebuild the condition)."""
    from fastdiff.models.unet2d import PRESETS, UNet2DConfig

    d = data.targets
    channels, size, extra = d.image_shape[0], d.image_shape[1], data.conditions.shape[1]
    labels = cfg.conditioning == "sketch+class"
    base = {**PRESETS[cfg.model].to_dict(), **cfg.model_overrides,
            "sample_size": size, "in_channels": channels + extra, "out_channels": channels,
            "num_classes": d.num_classes if labels else None, "null_class": labels,
            "class_names": list(d.class_names) if labels else []}
    cond = {"kind": data.kind, "channels": extra, "null": 0.0}
    if data.kind == "sketch":
        cond["sketch"] = dict(SKETCH_PARAMS)
    return {"kind": "diffusion", "unet": UNet2DConfig.from_dict(base).to_dict(), "condition": cond}


def condition_input(image: torch.Tensor, drop: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """The condition channels of a training batch: flipped with its images (``flip``: the same per-sample flags
    as the images', or None) and zero where the condition is dropped (``drop``, classifier-free guidance)."""
    if flip is not None:
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
    return image.masked_fill(drop[:, None, None, None], 0.0)
