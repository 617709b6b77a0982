"""ControlNet preprocessors on synthetic images whose answer is known: squares, outlines, label maps.

Oracles: the geometry of the drawn shapes, :func:`fastdiff.sketch.sketch` for the edges Canny must reproduce,
SciPy's ``gaussian_filter`` for the difference of Gaussians behind the scribble, and ADE20K's published class
colours (wall, sky, tree ...) for the segmentation palette.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import control

scipy_ndimage = pytest.importorskip("scipy.ndimage")


def _square(size=64, lo=16, hi=48, fg=1.0, bg=0.0) -> torch.Tensor:
    img = torch.full((1, 3, size, size), bg)
    img[..., lo:hi, lo:hi] = fg
    return img


def _ring(size, lo, hi, width) -> torch.Tensor:
    """Pixels within ``width`` of the square's boundary (inside or outside)."""
    r = torch.arange(size)
    inside = ((r >= lo - width) & (r < hi + width))
    outer = inside[:, None] & inside[None, :]
    core = ((r >= lo + width) & (r < hi - width))
    return outer & ~(core[:, None] & core[None, :])


def test_canny_on_a_square():
    img = _square()
    e = control.canny(img)
    assert e.shape == (1, 3, 64, 64) and e.dtype == torch.float32
    assert set(e.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(e[:, 0], e[:, 1]) and torch.equal(e[:, 0], e[:, 2])
    assert torch.equal(e[:, :1], fastdiff.sketch(img))
    m = e[0, 0].bool()
    assert not (m & ~_ring(64, 16, 48, 1)).any()  # every edge pixel on the square's outline
    # the outline is closed: each side of the square has an edge pixel in every row / column it spans
    rows, cols = m.any(1), m.any(0)
    assert rows[16:48].all() and cols[16:48].all()
    # the same image as uint8, numpy (H, W, C) and PIL gives the same map; batches stay batches
    u8 = (img * 255).to(torch.uint8)
    assert torch.equal(control.canny(u8), e)
    arr = u8[0].permute(1, 2, 0).numpy()
    assert torch.equal(control.canny(arr), e)
    from PIL import Image
    assert torch.equal(control.canny(Image.fromarray(arr)), e)
    two = torch.cat([img, torch.full_like(img, 0.5)])
    e2 = control.canny(two)
    assert e2.shape == (2, 3, 64, 64) and torch.equal(e2[:1], e) and not e2[1].any()


def _scribble_oracle(img: np.ndarray, threshold: float, s1: float, s2: float) -> np.ndarray:
    """The DoG rule with SciPy's Gaussian (replicated borders, radius round(3 sigma)), per channel."""
    def blur(s):
        return np.array([[scipy_ndimage.gaussian_filter(ch, s, mode="nearest", truncate=3.0) for ch in im]
                         for im in img])

    return 2.0 * (blur(s2) - blur(s1)).min(axis=1, keepdims=True) > threshold


def test_scribble_matches_dog_and_finds_strokes():
    # a dark outlined square (3 px strokes) on white paper, and a filled dark square
    outline = torch.ones(1, 3, 64, 64)
    outline[..., 16:48, 16:19] = outline[..., 16:48, 45:48] = 0.0
    outline[..., 16:19, 16:48] = outline[..., 45:48, 16:48] = 0.0
    filled = _square(fg=0.1, bg=0.9)
    img = torch.cat([outline, filled])
    s = control.scribble(img)
    assert s.shape == (2, 3, 64, 64) and set(s.unique().tolist()) == {0.0, 1.0}
    want = _scribble_oracle(img.double().numpy(), 32 / 255, 0.5, 5.0)
    got = s[:, :1].bool().numpy()
    assert (got != want).sum() <= 2, "differs from the SciPy difference of Gaussians"  # float ties at the threshold
    strokes = (outline[0, 0] == 0)
    line = s[0, 0].bool()
    assert line[strokes].float().mean() > 0.95  # the strokes are found
    assert not (line & ~_ring(64, 16, 48, 2) & ~strokes).any()  # and nothing far from them
    inner = s[1, 0].bool()
    # the dark side of the filled square's edge: inside it, within ~1.5 sigma_coarse of its sides (more at corners)
    dark = filled[0, 0] < 0.5
    assert inner.any() and not (inner & ~dark).any() and not (inner & ~_ring(64, 16, 48, 12)).any()
    assert 5 <= int(inner[32].sum()) // 2 <= 8
    assert not inner[28:36, 28:36].any() and not inner[:8].any()  # not its middle, not the light paper
    assert not control.scribble(torch.full((1, 3, 32, 32), 0.7)).any()
    # a larger threshold keeps a subset
    assert not (control.scribble(img, threshold=0.3).bool() & ~s.bool()).any()


def test_colorize_segmentation():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 4:12, 4:12] = 2   # ADE20K 2 = sky
    labels[1] = 4               # ADE20K 4 = tree
    labels[1, 0, 0] = 149
    out = control.colorize_segmentation(labels)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    rgb = (out * 255).round().to(torch.uint8)
    assert rgb[0, :, 0, 0].tolist() == [120, 120, 120]  # wall
    assert rgb[0, :, 8, 8].tolist() == [6, 230, 230]     # sky
    assert rgb[1, :, 5, 5].tolist() == [4, 200, 3]       # tree
    assert rgb[1, :, 0, 0].tolist() == [92, 0, 255]      # the last of the 150 classes
    assert control.ADE20K_PALETTE.shape == (150, 3)
    assert (rgb[0, :, 4:12, 4:12] == torch.tensor([6, 230, 230], dtype=torch.uint8)[:, None, None]).all()
    # numpy labels, (H, W) and (B, 1, H, W) shapes, a custom palette
    assert torch.equal(control.colorize_segmentation(labels[0].numpy()), out[:1])
    assert torch.equal(control.colorize_segmentation(labels[:, None]), out)
    two = control.colorize_segmentation(torch.tensor([[0, 1]]), palette=[[0, 0, 0], [255, 0, 255]])
    assert two[0, :, 0, 1].tolist() == [1.0, 0.0, 1.0] and two[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 149\]"):
        control.colorize_segmentation(torch.tensor([[0, 150]]))
    with pytest.raises(ValueError, match="labels must be integers"):
        control.colorize_segmentation(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="palette must be"):
        control.colorize_segmentation(torch.zeros(4, 4, dtype=torch.long), palette=[1, 2, 3])
    with pytest.raises(TypeError, match="canny: image must be"):
        control.canny([[0.0]])
    with pytest.raises(ValueError, match="scribble: need 0 < sigma_fine < sigma_coarse"):
        control.scribble(torch.zeros(1, 3, 8, 8), sigma_fine=2.0, sigma_coarse=1.0)
    with pytest.raises(ValueError, match="scribble: image must be"):
        control.scribble(torch.zeros(8))
