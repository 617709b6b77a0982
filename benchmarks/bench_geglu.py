"""GEGLU (SD1 transformer feed-forward) vs eager ``a * F.gelu(g)`` after ``chunk``: forward and training step."""
import pytest
import torch

from fastdiff.ops import geglu, geglu_ref
from fastdiff.ops.registry import all_ops

from conftest import nbytes

# SD1 at 512px, CFG batch 2: 4096 tokens at dim 320, 1024 at 640, 256 at 1280; GEGLU input is 2 x 4 x dim.
SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240)]
DTYPES = [torch.float32, torch.bfloat16]


def _case(shape, dtype):
    return f"{tuple(shape)} {str(dtype)[6:]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu_forward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype)
    backend = all_ops()["geglu"].select(x)
    y = geglu(x)
    compare(f"geglu fwd [{backend}]", _case(shape, dtype), lambda: geglu(x), lambda: geglu_ref(x), nbytes(x, y))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_geglu_forward_backward(compare, shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape[:-1] + (shape[-1] // 2,)).to(dtype)
    backend = all_ops()["geglu"].select(x)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x), x, dy)

    # forward reads x and writes y; backward reads x and dy and writes dx.
    moved = nbytes(x, dy) + nbytes(x, dy, x)
    compare(f"geglu fwd+bwd [{backend}]", _case(shape, dtype), step(geglu), step(geglu_ref), moved)
