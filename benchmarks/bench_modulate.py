"""adaLN ops of SD3's MMDiT vs the eager sequences they replace: modulate, LayerNorm + modulate (AdaLayerNormZero),
gated residual; forward and training step, at SD3 1024px (4096 image tokens, hidden 1536, CFG batch 2)."""
import pytest
import torch

from fastdiff.ops import (gate_residual, gate_residual_ref, layer_norm_modulate, layer_norm_modulate_ref, modulate,
                          modulate_ref)
from fastdiff.ops.registry import all_ops

from conftest import nbytes

SHAPES = [(2, 4096, 1536), (2, 1024, 1536)]
DTYPES = [torch.float32, torch.bfloat16]
OPS = {
    "modulate": (modulate, modulate_ref),
    "layer_norm_modulate": (layer_norm_modulate, layer_norm_modulate_ref),
    "gate_residual": (gate_residual, gate_residual_ref),
}


def _args(name, shape, dtype, grad=False):
    x = torch.randn(shape).to(dtype)
    v1 = (torch.randn(shape[0], shape[-1]) * 0.5).to(dtype)
    third = torch.randn(shape).to(dtype) if name == "gate_residual" else (torch.randn(shape[0], shape[-1]) * 0.5).to(dtype)
    args = (x, v1, third) if name != "gate_residual" else (x, v1, third)
    if grad:
        args = tuple(a.requires_grad_() for a in args)
    return args


def _case(shape, dtype):
    return f"{tuple(shape)} {str(dtype)[6:]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(OPS))
def test_forward(compare, name, shape, dtype):
    fn, ref = OPS[name]
    args = _args(name, shape, dtype)
    backend = all_ops()[name].select(*args)
    big = [a for a in args if a.dim() == 3]
    compare(f"{name} fwd [{backend}]", _case(shape, dtype), lambda: fn(*args), lambda: ref(*args),
            nbytes(*big, args[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(OPS))
def test_forward_backward(compare, name, shape, dtype):
    fn, ref = OPS[name]
    args = _args(name, shape, dtype, grad=True)
    dy = torch.randn(shape).to(dtype)
    backend = all_ops()[name].select(*args)

    def step(f):
        return lambda: torch.autograd.grad(f(*args), args, dy)

    big = [a for a in args if a.dim() == 3]
    compare(f"{name} fwd+bwd [{backend}]", _case(shape, dtype), step(fn), step(ref),
            nbytes(*big, args[0]) + nbytes(*big, dy, *big))
