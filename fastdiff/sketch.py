"""Edge maps of images: the "sketch" a sketch-to-image model is conditioned on. No network, no download.

``fastdiff.sketch(image)`` is a small Canny detector (Canny 1986) in PyTorch:

1. grey: ITU-R BT.601 luma for 3 channels, the channel mean otherwise;
2. optional Gaussian smoothing (``sigma``; 0, the default, suits 28-32 px images, whose edges are 1-2 px wide);
3. Sobel gradients gx, gy with replicated borders (the image frame is not an edge), magnitude ``hypot(gx, gy)``;
4. non-maximum suppression (``thin=True``): a pixel stays only if its magnitude is a maximum along its gradient
   direction (quantised to 0, 45, 90, 135 degrees), so an edge is one pixel wide (on a plateau of two equal
   pixels the one on the lower side of the gradient stays);
5. hysteresis: pixels at or above ``high`` times the image's largest magnitude are edges, and so are pixels at or
   above ``low`` times it that connect (8-neighbourhood) to one. The thresholds are relative, so the result does
   not depend on the pixel scale ([0, 1], [-1, 1] or 0..255 give the same map); a constant image has no edges.

Inputs and outputs:

* a tensor (H, W), (C, H, W) or (B, C, H, W), any real dtype -> float tensor (H, W), (1, H, W) or (B, 1, H, W)
  with 1.0 on edges and 0.0 elsewhere (float32 for integer inputs, else the input's dtype);
* a numpy array (H, W) or (H, W, C) -> float32 array (H, W) of 0/1;
* a PIL image -> PIL image of mode "L": edges 255 on 0.

``fastdiff.sketch`` is the function (the package exports it under the module's name); the module's other names
are imported with ``from fastdiff.sketch import edge_map``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sketch", "edge_map"]

_LUMA = (0.299, 0.587, 0.114)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3.0 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))


def _shift(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[r, c] = m[r + dy, c + dx]``, 0 outside the image."""
    p = F.pad(m, (1, 1, 1, 1))
    h, w = m.shape[-2:]
    return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def edge_map(gray: torch.Tensor, *, high: float = 0.3, low: float = 0.15, sigma: float = 0.0,
             thin: bool = True) -> torch.Tensor:
    """Edges of (B, 1, H, W) float grey images as a (B, 1, H, W) bool tensor (steps 2-5 of the module doc)."""
    if gray.dim() != 4 or gray.shape[1] != 1 or not gray.is_floating_point():
        raise ValueError(f"edge_map expects float (B, 1, H, W) grey images, got {gray.dtype} {tuple(gray.shape)}")
    if not 0.0 < high <= 1.0:
        raise ValueError(f"high must be in (0, 1], got {high}")
    if not 0.0 < low <= high:
        raise ValueError(f"low must be in (0, high], got {low} (high {high})")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    x = gray.float()
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, sx.view(1, 1, 3, 3))  # d/d column (cross-correlation: right minus left)
    gy = F.conv2d(xp, sx.t().contiguous().view(1, 1, 3, 3))  # d/d row (below minus above)
    mag = torch.hypot(gx, gy)
    if thin:
        # gradient direction in [0, 180) degrees, quantised to 4 bins; (dy, dx) = the neighbour along +gradient
        ang = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
        keep = torch.zeros_like(mag, dtype=torch.bool)
        for lo, hi, (dy, dx) in ((-1.0, 22.5, (0, 1)), (157.5, 181.0, (0, 1)), (22.5, 67.5, (1, 1)),
                                 (67.5, 112.5, (1, 0)), (112.5, 157.5, (1, -1))):
            in_bin = (ang >= lo) & (ang < hi)
            local_max = (mag >= _shift(mag, dy, dx)) & (mag > _shift(mag, -dy, -dx))
            keep |= in_bin & local_max
        mag = mag * keep
    peak = mag.amax(dim=(2, 3), keepdim=True)
    flat = peak <= 1e-6 * (x.abs().amax(dim=(2, 3), keepdim=True) + 1e-12)  # no structure: no edges
    strong = (mag >= high * peak) & ~flat
    weak = (mag >= low * peak) & ~flat
    edges = strong
    for _ in range(gray.shape[-2] * gray.shape[-1]):  # grows by one ring per pass; stops when nothing changes
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> float32 (B, 1, H, W)."""
    x = x.float()
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def sketch(image, *, high: float = 0.3, low: float = 0.15, sigma: float = 0.0, thin: bool = True):
    """Edge map of ``image`` (a tensor, numpy array or PIL image); see the module doc for the algorithm, the
    thresholds and what each input type returns."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np

        g = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))[None, None]
        e = edge_map(g, high=high, low=low, sigma=sigma, thin=thin)[0, 0]
        return Image.fromarray((e.numpy().astype(np.uint8) * 255), mode="L")
    if type(image).__module__ == "numpy" and hasattr(image, "ndim"):
        arr = torch.from_numpy(image.copy() if not image.flags.writeable else image)
        if arr.dim() == 3:
            arr = arr.permute(2, 0, 1)
        elif arr.dim() != 2:
            raise ValueError(f"sketch: a numpy image must be (H, W) or (H, W, C), got shape {tuple(image.shape)}")
        e = sketch(arr, high=high, low=low, sigma=sigma, thin=thin)
        return (e[0] if e.dim() == 3 else e).numpy().astype("float32")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"sketch: image must be a torch.Tensor, numpy array or PIL image, got {type(image).__name__}")
    if image.dim() not in (2, 3, 4) or image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"sketch: image must be a real (H, W), (C, H, W) or (B, C, H, W) tensor, "
                         f"got {image.dtype} {tuple(image.shape)}")
    dim = image.dim()
    x = image[None, None] if dim == 2 else image[None] if dim == 3 else image
    e = edge_map(_to_gray(x), high=high, low=low, sigma=sigma, thin=thin)
    out_dtype = image.dtype if image.is_floating_point() else torch.float32
    e = e.to(out_dtype)
    return e[0, 0] if dim == 2 else e[0] if dim == 3 else e
