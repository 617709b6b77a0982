"""Linear layer routed to the fastest CPU matmul, with the activation / residual fused into the output write.

The eager sequence it replaces (``linear_ref``)::

    y = F.linear(x, weight, bias)
    y = y + residual          # optional (an attention output projection + the skip)
    y = act(y)                # optional: 'silu', 'gelu' (erf) or 'gelu_tanh'

Why not ``F.linear``: on many x86 CPUs the fp32 BLAS path of ``torch.matmul`` / ``F.linear`` is slow, while oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op inductor emits
for linear + pointwise) is faster and applies the activation (a *unary* post-op) or the residual add (a
*binary* post-op) to each output block before it is stored. Measured ratios are in
benchmarks/bench_conv_block.py. Whether the activation is fused or applied after the matmul depends on the CPU:
the ``linear_activation`` column of :mod:`fastdiff.ops.routing`. As for the convolution, bf16 inputs are computed in
:func:`fastdiff.ops._onednn.onednn_math_dtype` (fp32 where oneDNN's bf16 kernels lose to its fp32 ones).

Autograd: the oneDNN op has no derivative; with grad the matmul + bias + residual runs inside
:class:`_LinearFn` (backward: ``grad @ W``, ``grad^T @ x``, ``sum(grad)``), and the activation is applied
outside it so autograd differentiates it from the saved pre-activation.

The :class:`Linear` module is an ``nn.Linear`` (same arguments, defaults, parameters and state_dict); in
inference the weight pre-packed for oneDNN replaces the plain one, and every read of the weight gets the plain
values back (:mod:`fastdiff.ops._packed`, with the measured time and memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops._onednn import autocast_cast, onednn_math_dtype, onednn_reasons
from fastdiff.ops._packed import PackedWeightMixin, plain_weight
from fastdiff.ops.registry import Op
from fastdiff.ops.routing import current_route, train_ref_reason

__all__ = ["ACTIVATIONS", "Linear", "linear", "linear_ref"]

_op = Op("linear")

# activation name -> (oneDNN post-op attr, algorithm, eager function)
_ACT = {
    "silu": ("swish", None, F.silu),
    "gelu": ("gelu", "none", F.gelu),
    "gelu_tanh": ("gelu", "tanh", lambda y: F.gelu(y, approximate="tanh")),
}
ACTIVATIONS = (None,) + tuple(_ACT)


def linear_ref(x, weight, bias=None, *, activation=None, residual=None):
    """Pure-PyTorch reference: ``act?(F.linear(x, weight, bias) + residual?)``."""
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = _ACT[activation][2](y)
    return y


# ---------------------------------------------------------------------------------------------- oneDNN path

def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return onednn_math_dtype(dtype)


def _onednn_forward(x, weight, bias, residual, activation, packer=None):
    out_dtype = x.dtype
    math = _math_dtype(out_dtype)
    xm = x.to(math)
    if not xm.is_contiguous():
        xm = xm.contiguous()
    w = packer(math, xm.numel() // xm.shape[-1]) if packer is not None else None
    if w is None:
        w = plain_weight(weight, packer).to(math)
    bm = bias.to(math) if bias is not None else None
    if residual is not None:
        y = torch.ops.mkldnn._linear_pointwise.binary(xm, residual.to(math).contiguous(), w, bm, "add")
        if activation is not None:
            y = _ACT[activation][2](y)
    elif activation is not None and current_route().linear_activation == "eager":
        # the routing row says oneDNN's unary post-op is the slow part of the fused op on this CPU: the same
        # matmul, then the activation in the math dtype (fp32 for bf16 inputs: one rounding at the end, as fused)
        y = _ACT[activation][2](torch.ops.mkldnn._linear_pointwise(xm, w, bm, "none", [], None))
    elif activation is not None:
        attr, algo, _ = _ACT[activation]
        y = torch.ops.mkldnn._linear_pointwise(xm, w, bm, attr, [], algo)
    else:
        y = torch.ops.mkldnn._linear_pointwise(xm, w, bm, "none", [], None)
    return y.to(out_dtype)


class _LinearFn(torch.autograd.Function):
    """x @ W^T + bias + residual through oneDNN; backward = the standard linear backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_forward(x, weight, bias, residual, None)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        math = _math_dtype(x.dtype)
        g2 = grad.reshape(-1, grad.shape[-1]).to(math)
        gx = gw = gb = None
        if need_x:
            gx = (g2 @ weight.to(math)).reshape(x.shape).to(x.dtype)
        if need_w:
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(math)).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb, (grad if need_r else None)


def _linear_cpu(x, weight, bias, activation, residual, packer):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        y = _LinearFn.apply(x, plain_weight(weight, packer), bias, residual)
        return _ACT[activation][2](y) if activation is not None else y
    return _onednn_forward(x, weight, bias, residual, activation, packer)


def _cpu_reasons(x, weight, bias, activation, residual, packer):
    return onednn_reasons(x, weight, bias, residual)


# Below this many multiply-adds the per-call cost of the oneDNN path (argument checks, dtype casts, the op
# call) exceeds what it saves: 2x320->1280 + SiLU measured 0.31x eager in fp32 and 0.80x in bf16.
_SMALL_MACS = 1 << 22


def _cpu_slower(x, weight, bias, activation, residual, packer):
    """When automatic choice leaves the oneDNN path to eager F.linear (benchmarks/bench_conv_block.py; in
    training, the routing row's ``train_ref``, benchmarks/bench_train_ops.py)."""
    why = train_ref_reason("linear", x, weight, bias, residual)
    if why is not None:
        return why
    macs = x.numel() // max(x.shape[-1], 1) * weight.shape[0] * weight.shape[1]
    if macs < _SMALL_MACS:
        return f"small matmul ({macs} multiply-adds < {_SMALL_MACS}): eager F.linear is faster (per-call overhead)"
    if x.dtype == torch.float32 and activation is None and residual is None:
        return "plain fp32 linear: oneDNN ties F.linear (0.95-1.07x measured) and there is nothing to fuse"
    if x.dtype == torch.float32 and activation is not None and residual is None:
        route = current_route()
        if route.linear_activation == "eager":
            # the unfused oneDNN matmul then the activation is no faster than F.linear then the activation
            return (f"fp32 linear + {activation}: oneDNN's fused post-op loses to F.linear + the eager activation "
                    f"on {route.capability} CPUs (routing row {route.name!r}, {route.evidence[0]})")
    return None


def _linear_ref_impl(x, weight, bias, activation, residual, packer):
    return linear_ref(x, plain_weight(weight, packer), bias, activation=activation, residual=residual)


_op.register("ref")(_linear_ref_impl)
_op.register("cpu", _cpu_reasons, needs_backend=False, slower=_cpu_slower)(_linear_cpu)  # torch oneDNN: no _C


# ---------------------------------------------------------------------------------------------- public API

def _check(x, weight, bias, activation, residual):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("linear: x and weight must be tensors")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match "
                         "(weight is (out_features, in_features), x is (..., in_features))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"linear: x, weight and bias must share one dtype; got {x.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        want = tuple(x.shape[:-1]) + (weight.shape[0],)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != want:
            raise ValueError(f"linear: residual must be a tensor of the output's shape {want}")
        if residual.dtype != x.dtype:
            raise TypeError(f"linear: residual dtype {residual.dtype} differs from x dtype {x.dtype}")


def _linear(x, weight, bias=None, *, activation=None, residual=None, packer=None):
    x, weight, bias, residual = autocast_cast(x, weight, bias, residual)
    _check(x, weight, bias, activation, residual)
    if x.dim() == 1:
        r = residual.unsqueeze(0) if residual is not None else None
        return _op(x.unsqueeze(0), weight, bias, activation, r, packer)[0]
    return _op(x, weight, bias, activation, residual, packer)


def linear(x, weight, bias=None, *, activation=None, residual=None):
    """``act?(F.linear(x, weight, bias) + residual?)`` on the fastest CPU path.

    ``activation``: None, 'silu', 'gelu' (exact, erf) or 'gelu_tanh'. ``residual`` has the output's shape
    and x's dtype. Differentiable in x, weight, bias and residual.
    """
    return _linear(x, weight, bias, activation=activation, residual=residual)


class Linear(PackedWeightMixin, nn.Linear):
    """Drop-in ``nn.Linear`` (same arguments, defaults, parameter names and state_dict) on :func:`linear`.

    ``forward(input, activation=None, residual=None)``. In inference (eval mode, no grad wanted) the weight
    pre-packed for oneDNN replaces the plain one after its second call; reading ``weight``, ``state_dict``,
    ``.to()``, ``train()`` put the plain weight back exactly (:mod:`fastdiff.ops._packed`; ``pack_policy``
    chooses ``"replace"``, ``"cache"`` or ``"off"``).
    """

    # Where bf16 math runs in fp32 the packed copy of a bf16 weight is fp32, twice its size; for linears that
    # bought the least time per byte (SD1.5 UNet, 256x256 bf16 step on an AVX2 CPU: 4.5 s of 56.7 s saved for
    # 0.90 GiB of packed copies, vs 18.9 s for 2.0 GiB of 3x3 convolutions; fastdiff.ops._packed), so such
    # linears convert per call. Where bf16 math is native the packed copy is bf16 and replaces the plain weight.
    pack_wider = False

    def _fd_key(self, math, rows) -> tuple:
        # The packed layout oneDNN picks for one batch size is valid for every batch size; the row count only
        # tunes the blocking, so one packed weight serves all token counts.
        return (math,)

    def _fd_make_pack(self, weight, math, rows):
        return torch.ops.mkldnn._reorder_linear_weight(weight.to(math).contiguous(), max(rows, 1))

    def forward(self, input: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None):
        packer = self._fd_packer(input, residual)
        return _linear(input, self._parameters["weight"], self.bias, activation=activation, residual=residual,
                       packer=packer)
