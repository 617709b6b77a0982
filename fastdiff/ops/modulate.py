"""adaLN of DiT / SD3 (MMDiT): ``modulate``, ``layer_norm_modulate`` and ``gate_residual``, forward and backward.

Shapes: ``x`` is (B, L, D) (any (B, ..., D)); ``shift``, ``scale`` and ``gate`` are (B, D), one vector per
batch element, broadcast over its tokens:

- ``modulate(x, shift, scale) = x * (1 + scale[:, None]) + shift[:, None]``
- ``layer_norm_modulate(x, shift, scale, eps=1e-6) = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``,
  LayerNorm without affine: SD3's ``AdaLayerNormZero`` (``nn.LayerNorm(D, elementwise_affine=False,
  eps=1e-6)``). The fusion is where the win is: eager runs a layer norm, an add, a multiply and an add, each
  a full pass over x; the kernel reads x once and writes y once.
- ``gate_residual(x, gate, y) = x + gate[:, None] * y`` (the gated residual after attention / MLP).

The kernels run when the per-batch vectors share x's dtype (the eager result then has that dtype too); they
compute in fp32 (eager bf16 rounds 1 + scale to bf16 first) and round once. Math:
csrc/include/fastdiff/math/modulate.h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops._checks import CPU_DTYPES, CUDA_DTYPES, device_dtype_reasons
from fastdiff.ops.registry import Op

__all__ = [
    "gate_residual",
    "gate_residual_ref",
    "layer_norm_modulate",
    "layer_norm_modulate_ref",
    "modulate",
    "modulate_ref",
]

_modulate = Op("modulate")
_ln_modulate = Op("layer_norm_modulate")
_gate_residual = Op("gate_residual")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1, ..., 1, D) to broadcast over the token dimensions of x."""
    return v.view((v.shape[0],) + (1,) * (x.dim() - 2) + (v.shape[1],))


def modulate_ref(x, shift, scale):
    return x * (1 + _bcast(scale, x)) + _bcast(shift, x)


def layer_norm_modulate_ref(x, shift, scale, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + _bcast(scale, x)) + _bcast(shift, x)


def gate_residual_ref(x, gate, y):
    return x + _bcast(gate, x) * y


def _check(op, x, vecs, others=()):
    if not isinstance(x, torch.Tensor) or not all(isinstance(v, torch.Tensor) for v in vecs + others):
        raise TypeError(f"{op}: all arguments must be tensors")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (B, ..., D), got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[-1])
    for v in vecs:
        if tuple(v.shape) != want:
            raise ValueError(f"{op}: shift/scale/gate must be (B, D) = {want} for x {tuple(x.shape)}, got "
                             f"{tuple(v.shape)}")
    for o in others:
        if o.shape != x.shape:
            raise ValueError(f"{op}: y {tuple(o.shape)} must have the shape of x {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")


def _reasons(backend, dtypes):
    def reasons(x, *vecs, eps=None):
        tensors = [v for v in vecs if isinstance(v, torch.Tensor)]
        out = device_dtype_reasons(backend, x, *tensors, dtypes=dtypes)
        if any(t.dtype != x.dtype for t in tensors):
            out.append(f"inputs mix dtypes ({', '.join(sorted({str(t.dtype) for t in [x, *tensors]}))}); the "
                       "kernels need one")
        return out
    return reasons


def _vec(v):
    # The kernels read the (B, D) vectors as fp32; the cast is differentiable, so gradients return in v's dtype.
    return v.float().contiguous()


def _modulate_compiled(x, shift, scale):
    return torch.ops.fastdiff.modulate(x.contiguous(), _vec(shift), _vec(scale))


def _ln_modulate_compiled(x, shift, scale, eps=1e-6):
    return torch.ops.fastdiff.layer_norm_modulate(x.contiguous(), _vec(shift), _vec(scale), float(eps))[0]


def _gate_residual_compiled(x, gate, y):
    return torch.ops.fastdiff.gate_residual(x.contiguous(), _vec(gate), y.contiguous())


for _o, _ref, _fn in ((_modulate, modulate_ref, _modulate_compiled),
                      (_ln_modulate, layer_norm_modulate_ref, _ln_modulate_compiled),
                      (_gate_residual, gate_residual_ref, _gate_residual_compiled)):
    _o.register("ref")(_ref)
    _o.register("cpu", _reasons("cpu", CPU_DTYPES))(_fn)
    _o.register("cuda", _reasons("cuda", CUDA_DTYPES))(_fn)

if _ext.has_cpu_kernels():
    def _f32_like(x):
        return x.new_empty((x.shape[0], x.shape[-1]), dtype=torch.float32)

    def _stats(x):
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    def _maybe(x, wanted):
        return _f32_like(x) if wanted else x.new_empty((0,), dtype=torch.float32)

    torch.library.register_fake("fastdiff::modulate")(lambda x, shift, scale: torch.empty_like(x))
    torch.library.register_fake("fastdiff::modulate_bwd")(
        lambda grad, x, scale, p: (torch.empty_like(x), _maybe(x, p), _maybe(x, p)))
    torch.library.register_fake("fastdiff::layer_norm_modulate")(
        lambda x, shift, scale, eps: (torch.empty_like(x), _stats(x), _stats(x)))
    torch.library.register_fake("fastdiff::layer_norm_modulate_bwd")(
        lambda grad, x, scale, mean, rstd, p: (torch.empty_like(x), _maybe(x, p), _maybe(x, p)))
    torch.library.register_fake("fastdiff::gate_residual")(lambda x, gate, y: torch.empty_like(x))
    torch.library.register_fake("fastdiff::gate_residual_bwd")(
        lambda grad, gate, y, p: (torch.empty_like(y), _maybe(y, p)))

    def _mod_setup(ctx, inputs, output):
        x, _, scale = inputs
        ctx.save_for_backward(x, scale)

    def _mod_backward(ctx, grad):
        x, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = torch.ops.fastdiff.modulate_bwd(grad.contiguous(), x, scale, bool(need[1] or need[2]))
        return dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None

    def _lnm_setup(ctx, inputs, output):
        x, _, scale, _ = inputs
        ctx.save_for_backward(x, scale, output[1], output[2])

    def _lnm_backward(ctx, grad, _gm, _gr):
        x, scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = torch.ops.fastdiff.layer_norm_modulate_bwd(grad.contiguous(), x, scale, mean, rstd,
                                                                        bool(need[1] or need[2]))
        return dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None, None

    def _gr_setup(ctx, inputs, output):
        _, gate, y = inputs
        ctx.save_for_backward(gate, y)

    def _gr_backward(ctx, grad):
        gate, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        dy, dgate = torch.ops.fastdiff.gate_residual_bwd(grad, gate, y, bool(need[1]))
        return grad if need[0] else None, dgate if need[1] else None, dy if need[2] else None

    torch.library.register_autograd("fastdiff::modulate", _mod_backward, setup_context=_mod_setup)
    torch.library.register_autograd("fastdiff::layer_norm_modulate", _lnm_backward, setup_context=_lnm_setup)
    torch.library.register_autograd("fastdiff::gate_residual", _gr_backward, setup_context=_gr_setup)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale[:, None]) + shift[:, None]`` (DiT / SD3 adaLN), differentiable."""
    _check("modulate", x, (shift, scale))
    return _modulate(x, shift, scale)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` with a LayerNorm without affine over the last
    dimension (SD3's AdaLayerNormZero), in one pass; differentiable."""
    _check("layer_norm_modulate", x, (shift, scale))
    return _ln_modulate(x, shift, scale, eps=eps)


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` (adaLN-Zero gated residual), differentiable."""
    _check("gate_residual", x, (gate,), (y,))
    return _gate_residual(x, gate, y)
