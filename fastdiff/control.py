"""Control images for ControlNets, made without a network or a download: each returns a float (B, 3, H, W)
tensor in [0, 1] at the input's resolution, the form a ControlNet pipeline takes.

* :func:`canny`: Canny edges (white on black), the control of the ``canny`` ControlNets; the detector is
  :func:`fastdiff.sketch.sketch` (Sobel, non-maximum suppression, hysteresis with thresholds relative to the
  image's strongest edge, so [0, 1], [-1, 1] or 0..255 inputs give the same map).
* :func:`scribble`: scribble lines from an image by a difference of Gaussians (the "xDoG" scribble of the
  ControlNet 1.1 annotators): a pixel is a line where a wide blur is brighter than a narrow one by more than
  ``threshold / 2`` in some channel, i.e. on thin dark strokes and on the dark side of edges.
* :func:`colorize_segmentation`: integer class labels -> the colours of a palette, ADE20K's 150-class palette by
  default (what the ``seg`` ControlNets were trained on; label i takes ADE20K class i's colour, 0 = wall).

Images may be tensors (H, W), (C, H, W) or (B, C, H, W) (floating point in [0, 1], or uint8 0..255), numpy
arrays (H, W) or (H, W, C), or PIL images.
"""
from __future__ import annotations

import torch

from fastdiff.sketch import _gaussian_blur, sketch

__all__ = ["ADE20K_PALETTE", "canny", "colorize_segmentation", "scribble"]

# ADE20K's class colours (RGB, 0..255), one 6-digit hex triple per class 0..149 (the dataset's published
# palette; classes 6 and 48 share 140, 140, 140 there).
_ADE20K_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = torch.tensor([[int(_ADE20K_HEX[i:i + 2], 16) for i in range(j, j + 6, 2)]
                               for j in range(0, len(_ADE20K_HEX), 6)], dtype=torch.uint8)


def _as_images(image, what: str) -> torch.Tensor:
    """``image`` as a float32 (B, C, H, W) tensor; uint8 input is scaled to [0, 1]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np

        image = np.asarray(image.convert("RGB"))
    if type(image).__module__ == "numpy" and hasattr(image, "ndim"):
        if image.ndim not in (2, 3):
            raise ValueError(f"{what}: a numpy image must be (H, W) or (H, W, C), got shape {tuple(image.shape)}")
        t = torch.from_numpy(image.copy())
        image = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what}: image must be a torch.Tensor, numpy array or PIL image, got {type(image).__name__}")
    if image.dim() not in (2, 3, 4) or image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"{what}: image must be a real (H, W), (C, H, W) or (B, C, H, W) tensor, "
                         f"got {image.dtype} {tuple(image.shape)}")
    x = image[None, None] if image.dim() == 2 else image[None] if image.dim() == 3 else image
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def canny(image, *, low: float = 0.15, high: float = 0.3, sigma: float = 0.0) -> torch.Tensor:
    """Canny edges of ``image`` as (B, 3, H, W) float32: 1.0 on edges, 0.0 elsewhere.

    ``high`` / ``low`` are the hysteresis thresholds as fractions of the image's largest gradient; ``sigma``
    smooths first (about 1-1.5 for photographs, 0 for small or clean images). See :mod:`fastdiff.sketch`."""
    x = _as_images(image, "canny")
    return sketch(x, high=high, low=low, sigma=sigma).expand(-1, 3, -1, -1).contiguous()


def scribble(image, *, threshold: float = 32 / 255, sigma_fine: float = 0.5,
             sigma_coarse: float = 5.0) -> torch.Tensor:
    """Scribble lines of ``image`` (values in [0, 1]) as (B, 3, H, W) float32: 1.0 on lines, 0.0 elsewhere.

    A pixel is a line where, in some channel, the image blurred with ``sigma_coarse`` exceeds it blurred with
    ``sigma_fine`` by more than ``threshold / 2``: dark strokes thinner than about ``sigma_coarse`` and the dark
    side of edges. A larger ``threshold`` keeps fewer, stronger lines."""
    if not 0.0 < sigma_fine < sigma_coarse:
        raise ValueError(f"scribble: need 0 < sigma_fine < sigma_coarse, got {sigma_fine} and {sigma_coarse}")
    if threshold <= 0:
        raise ValueError(f"scribble: threshold must be > 0, got {threshold}")
    x = _as_images(image, "scribble")
    b, c, h, w = x.shape
    flat = x.reshape(b * c, 1, h, w)
    dog = (_gaussian_blur(flat, sigma_coarse) - _gaussian_blur(flat, sigma_fine)).reshape(b, c, h, w)
    lines = 2.0 * dog.amin(dim=1, keepdim=True) > threshold
    return lines.float().expand(-1, 3, -1, -1).contiguous()


def colorize_segmentation(labels, palette=None) -> torch.Tensor:
    """Integer class labels (H, W), (B, H, W) or (B, 1, H, W) (tensor or numpy) -> (B, 3, H, W) float32 colours
    in [0, 1]: label i takes ``palette[i]`` (RGB 0..255; ADE20K's 150 colours by default)."""
    if type(labels).__module__ == "numpy" and hasattr(labels, "ndim"):
        labels = torch.from_numpy(labels.copy())
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"colorize_segmentation: labels must be a tensor or numpy array, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"colorize_segmentation: labels must be integers, got {labels.dtype}")
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() == 2:
        labels = labels[None]
    if labels.dim() != 3:
        raise ValueError(f"colorize_segmentation: labels must be (H, W), (B, H, W) or (B, 1, H, W), "
                         f"got {tuple(labels.shape)}")
    pal = ADE20K_PALETTE if palette is None else torch.as_tensor(palette)
    if pal.dim() != 2 or pal.shape[1] != 3 or pal.shape[0] == 0:
        raise ValueError(f"colorize_segmentation: palette must be (N, 3) RGB colours, got {tuple(pal.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= pal.shape[0]):
        raise ValueError(f"colorize_segmentation: labels must be in [0, {pal.shape[0] - 1}] for a palette of "
                         f"{pal.shape[0]} colours, got [{int(labels.min())}, {int(labels.max())}]")
    colours = pal.to(device=labels.device, dtype=torch.float32) / 255.0
    return colours[labels.long()].permute(0, 3, 1, 2).contiguous()
