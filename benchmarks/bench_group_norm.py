"""GroupNorm + SiLU (+ residual): fastdiff's chosen backend vs eager ``F.silu(F.group_norm(x))``, same run.

Run: ``pytest benchmarks/bench_group_norm.py --benchmark-only -q``. GB/s counts the bytes the op must move
(inputs read once, outputs written once); the copy row of the summary is the machine's memory ceiling.
Targets: forward at (2, 320, 64, 64) >= 2x eager in bf16, >= 1.6x in fp32, >= 60 % of copy bandwidth.
Both sides allocate their outputs and are warmed up (fresh allocations page-fault, see conftest, which raises the malloc
thresholds for both alike).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import group_norm
from fastdiff.ops.group_norm import _op

from conftest import nbytes

# SD1 UNet levels at 64x64 latents (C = 320/640/1280 at 64/32/16/8) and the VAE decoder (128/256/512 channels).
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (1, 512, 64, 64),
          (1, 256, 128, 128), (1, 128, 256, 256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(shape, dtype, cl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(dtype)
    b = (0.1 * torch.randn(shape[1], generator=g)).to(dtype)
    return x, w, b


def _case(shape, dname, cl, extra=""):
    return f"{'x'.join(map(str, shape))} {dname} {'cl' if cl else 'nchw'}{extra}"


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_forward(compare, shape, dname, cl):
    x, w, b = _inputs(shape, DTYPES[dname], cl)
    backend = _op.select(x, 32, w, b, 1e-5, silu=True)
    with torch.no_grad():
        fast = lambda: group_norm(x, 32, w, b, 1e-5, silu=True)  # noqa: E731
        eager = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
        compare(f"group_norm+silu fwd [{backend}]", _case(shape, dname, cl), fast, eager, nbytes(x, x))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_group_norm_silu_temb_forward(compare, dname, cl):
    """The ResBlock's norm2: silu(group_norm(h + temb[:, :, None, None])), temb (B, C)."""
    shape = (2, 320, 64, 64)
    x, w, b = _inputs(shape, DTYPES[dname], cl)
    temb = torch.randn(shape[:2]).to(x.dtype)
    backend = _op.select(x, 32, w, b, 1e-5, silu=True, residual=temb)
    with torch.no_grad():
        fast = lambda: group_norm(x, 32, w, b, 1e-5, silu=True, residual=temb)  # noqa: E731
        eager = lambda: F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b, 1e-5))  # noqa: E731
        compare(f"group_norm+temb+silu fwd [{backend}]", _case(shape, dname, cl), fast, eager, nbytes(x, x))


@pytest.mark.parametrize("dname", list(DTYPES))
def test_group_norm_silu_residual_forward(compare, dname):
    """A full residual normalised with the input: silu(group_norm(x + r))."""
    shape = (2, 320, 64, 64)
    x, w, b = _inputs(shape, DTYPES[dname], False)
    r = torch.randn(shape).to(x.dtype)
    backend = _op.select(x, 32, w, b, 1e-5, silu=True, residual=r)
    with torch.no_grad():
        fast = lambda: group_norm(x, 32, w, b, 1e-5, silu=True, residual=r)  # noqa: E731
        eager = lambda: F.silu(F.group_norm(x + r, 32, w, b, 1e-5))  # noqa: E731
        compare(f"group_norm+res+silu fwd [{backend}]", _case(shape, dname, False), fast, eager, nbytes(x, r, x))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_forward_backward(compare, shape, dname, cl):
    x, w, b = _inputs(shape, DTYPES[dname], cl)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    dy = torch.randn(shape).to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    backend = _op.select(x, 32, w, b, 1e-5, silu=True)

    def run(fn):
        def step():
            x.grad = w.grad = b.grad = None
            fn().backward(dy)
        return step

    fast = run(lambda: group_norm(x, 32, w, b, 1e-5, silu=True))
    eager = run(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)))
    # forward: read x, write y; backward: read x and dy, write dx
    compare(f"group_norm+silu fwd+bwd [{backend}]", _case(shape, dname, cl), fast, eager, nbytes(x, x, x, dy, x))
