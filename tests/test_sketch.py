"""fastdiff.sketch on synthetic images whose edges are known: a filled square has edges on its border only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.sketch import edge_map

LO, HI = 10, 21  # the square fills rows and columns 10..21 of a 32x32 image


def _square(value=1.0, background=0.0, size=32):
    x = torch.full((size, size), background)
    x[LO:HI + 1, LO:HI + 1] = value
    return x


def _check_square_edges(e: torch.Tensor):
    e = e.bool()
    assert e.shape == (32, 32)
    # Sobel responds only on the two pixel rows/columns either side of the boundary: rows/cols 9..10 and 21..22
    ring = torch.zeros(32, 32, dtype=torch.bool)
    ring[LO - 1:HI + 2, LO - 1:HI + 2] = True
    ring[LO + 1:HI, LO + 1:HI] = False
    assert not (e & ~ring).any(), f"edges off the border at {(e & ~ring).nonzero().tolist()}"
    # every side is covered along its whole straight part, by exactly one pixel across (thin edges)
    for k in range(LO + 1, HI):
        assert int(e[LO - 1:LO + 1, k].sum()) == 1, f"top side, column {k}"
        assert int(e[HI:HI + 2, k].sum()) == 1, f"bottom side, column {k}"
        assert int(e[k, LO - 1:LO + 1].sum()) == 1, f"left side, row {k}"
        assert int(e[k, HI:HI + 2].sum()) == 1, f"right side, row {k}"


def test_filled_square_edges_on_border_only():
    _check_square_edges(fastdiff.sketch(_square()))


@pytest.mark.parametrize("value,background", [(1.0, -1.0), (255.0, 0.0), (-0.5, 0.7)])
def test_independent_of_pixel_scale_and_polarity(value, background):
    assert torch.equal(fastdiff.sketch(_square(value, background)), fastdiff.sketch(_square()))


def test_shapes_and_input_types():
    sq = _square()
    rgb = torch.stack([sq, sq, sq])  # (3, H, W): luma of a grey image is the image
    want = fastdiff.sketch(sq)
    out = fastdiff.sketch(rgb)
    assert out.shape == (1, 32, 32) and torch.equal(out[0], want)
    batch = torch.stack([rgb, torch.zeros_like(rgb)])
    out = fastdiff.sketch(batch)
    assert out.shape == (2, 1, 32, 32) and torch.equal(out[0, 0], want)
    assert out[1].sum() == 0  # a constant image has no edges
    u8 = (sq * 255).to(torch.uint8)
    assert fastdiff.sketch(u8).dtype == torch.float32 and torch.equal(fastdiff.sketch(u8), want)
    assert fastdiff.sketch(sq.double()).dtype == torch.float64
    arr = (sq.numpy() * 255).astype(np.uint8)
    assert np.array_equal(fastdiff.sketch(arr), want.numpy())
    assert np.array_equal(fastdiff.sketch(np.stack([arr] * 3, -1)), want.numpy())
    pil = fastdiff.sketch(Image.fromarray(arr))
    assert pil.mode == "L" and np.array_equal(np.asarray(pil) > 0, want.numpy() > 0)
    assert set(np.unique(np.asarray(pil)).tolist()) == {0, 255}


def test_without_thinning_both_sides_and_smoothing_stays_near_border():
    e = fastdiff.sketch(_square(), thin=False)
    # both pixels across each side respond with the same magnitude
    assert e[LO - 1, 15] == 1 and e[LO, 15] == 1
    blurred = fastdiff.sketch(_square(), sigma=1.0).bool()
    ring = torch.zeros(32, 32, dtype=torch.bool)
    ring[LO - 2:HI + 3, LO - 2:HI + 3] = True
    ring[LO + 2:HI - 1, LO + 2:HI - 1] = False
    assert blurred.any() and not (blurred & ~ring).any()


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    # a strong step (1.0), a weak one (0.2) that runs into it, and an isolated weak square far away
    x = torch.zeros(32, 32)
    x[:, 16:] = 1.0                 # strong vertical edge at column 15/16, rows 0..31
    x[24:, :16] = 0.2               # weak horizontal edge at row 23/24, columns 0..15, meeting the strong one
    x[8:12, 4:8] = 0.2              # an isolated weak square
    e = edge_map(x[None, None], high=0.5, low=0.1)[0, 0]
    assert e[:, 15:17].any(1).all()  # the strong edge, every row
    assert e[23:25, 1:14].any(0).all()  # the connected weak edge, every column
    assert not e[6:14, 2:10].any()   # the weak square is alone: dropped
    e_low = edge_map(x[None, None], high=0.15, low=0.1)[0, 0]
    assert e_low[6:14, 2:10].any()   # with a lower high threshold it is an edge


def test_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor, numpy array or PIL image"):
        fastdiff.sketch([[0, 1]])
    with pytest.raises(ValueError, match="sketch: image must be a real"):
        fastdiff.sketch(torch.zeros(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="low must be in"):
        fastdiff.sketch(_square(), high=0.2, low=0.3)
