"""Pillow-only pictures for a training run: a loss curve (no matplotlib). The image helpers (``to_pil``,
``image_grid``, ``save_png_atomic``) live in :mod:`fastdiff.io.images` and are re-exported here."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastdiff.io.images import image_grid, save_png_atomic, to_pil

__all__ = ["to_pil", "image_grid", "loss_curve", "save_png_atomic"]


def loss_curve(steps: Sequence[int], losses: Sequence[float], *, size=(640, 360), title: str = "loss") -> Image.Image:
    """A log-scale loss curve: raw points in light grey, an exponential moving average in blue."""
    W, H = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    L, R, T, B = 60, 15, 25, 35  # margins
    d.text((L, 6), title, fill=(0, 0, 0), font=font)
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(losses) & (losses > 0)
    steps, losses = steps[ok], losses[ok]
    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    if len(losses) < 2:
        d.text((L + 10, T + 10), "not enough points yet", fill=(0, 0, 0), font=font)
        return img
    # Bias-corrected EMA whose horizon is ~1/20 of the points, so it tracks the curve at any length.
    beta = 1.0 - 1.0 / max(1.0, len(losses) / 20.0)
    ema = np.empty_like(losses)
    acc = 0.0
    for i, v in enumerate(losses):
        acc = beta * acc + (1 - beta) * v
        ema[i] = acc / (1 - beta ** (i + 1)) if beta > 0 else v
    ly = np.log10(losses)
    lo, hi = np.percentile(ly, 1), np.max(np.log10(ema)) + 0.05
    lo = min(lo, np.log10(ema).min()) - 0.05
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

    def xy(s, v):
        x = L + (s - x0) / (x1 - x0) * (W - L - R)
        y = T + (hi - np.log10(v)) / (hi - lo) * (H - T - B)
        return float(x), float(min(max(y, T), H - B))

    d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(190, 190, 190), width=1)
    d.line([xy(s, v) for s, v in zip(steps, ema)], fill=(30, 80, 200), width=2)
    for frac in (0.0, 0.5, 1.0):  # y ticks
        v = 10 ** (hi - frac * (hi - lo))
        d.text((4, T + frac * (H - T - B) - 5), f"{v:.3g}", fill=(0, 0, 0), font=font)
    d.text((L, H - B + 8), f"step {int(x0)}", fill=(0, 0, 0), font=font)
    end = f"step {int(steps.max())}  ema loss {ema[-1]:.4g}"
    d.text((W - R - d.textlength(end, font=font), H - B + 8), end, fill=(0, 0, 0), font=font)
    return img
