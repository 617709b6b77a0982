"""2-D convolution with the elementwise work around it fused into the output write.

The eager sequence it replaces (``conv2d_ref``)::

    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = y + residual          # optional: the ResBlock skip, added while the output tile is still in cache
    y = F.silu(y)             # optional

On CPU the ``cpu`` backend calls oneDNN through torch (``torch.ops.mkldnn._convolution_pointwise``, the op
inductor emits for conv + pointwise): the bias, the residual add (a oneDNN *binary* post-op) or the SiLU (a
*unary* "swish" post-op) are applied to each output block before it is stored, saving one full read and
write of the activation per fused op. oneDNN's binary post-ops cannot be followed by swish, so
``residual`` + ``silu`` fuses the add and applies SiLU in place afterwards.

bf16 inputs are computed in :func:`fastdiff.ops._onednn.onednn_math_dtype` (fp32 on CPUs where oneDNN's bf16
convolution is slower than its fp32 one, see that module) and rounded to bf16 once.

Autograd: the oneDNN op has no derivative, so when an input requires grad the op runs inside
:class:`_Conv2dFn`, whose backward is ``aten.convolution_backward`` (the standard conv backward) plus the
identity for the residual. With ``silu`` and grad, SiLU is applied outside the Function (its backward needs
the pre-activation, which the fused op never materialises).

The :class:`Conv2d` module is an ``nn.Conv2d`` (same arguments, defaults, parameters and state_dict) whose
forward takes optional ``residual`` / ``silu``. In inference, for channels_last inputs, the weight pre-packed in
oneDNN's blocked layout (for the math dtype and the input shape) replaces the plain one; every read of the
weight gets the plain values back (:mod:`fastdiff.ops._packed`, which also gives the measured time and memory).
Keep activations channels_last for speed: oneDNN reads and writes that layout directly, whereas NCHW tensors are
reordered to a blocked layout and back around every convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops._onednn import autocast_cast, onednn_math_dtype, onednn_reasons
from fastdiff.ops._packed import PackedWeightMixin, plain_weight
from fastdiff.ops.registry import Op
from fastdiff.ops.routing import train_ref_reason

__all__ = ["Conv2d", "conv2d", "conv2d_ref"]

_op = Op("conv2d")


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"conv2d: {what} must be an int or a pair, got {v}")
    return v


def _channels_last(t: torch.Tensor) -> bool:
    """torch's suggest_memory_format for a 4-D tensor: channels are the innermost dimension."""
    return t.dim() == 4 and t.size(1) > 1 and t.stride(1) == 1 and not t.is_contiguous()


def _out_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    # torch's CPU convolution returns channels_last when the input or the weight is channels_last.
    return torch.channels_last if (_channels_last(x) or _channels_last(weight)) else torch.contiguous_format


def conv2d_ref(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None, silu=False):
    """Pure-PyTorch reference: ``silu?(F.conv2d(x, weight, bias, ...) + residual?)``."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    if silu:
        y = F.silu(y)
    return y


# ---------------------------------------------------------------------------------------------- oneDNN path

def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return onednn_math_dtype(dtype)


def _onednn_forward(x, weight, bias, residual, stride, padding, dilation, groups, silu, packer=None):
    """One fused oneDNN convolution; returns ``x.dtype`` in the memory format torch's conv would use."""
    out_dtype = x.dtype
    math = _math_dtype(out_dtype)
    fmt = _out_format(x, weight)
    xm = x.to(math).contiguous(memory_format=fmt)
    # The pre-packed weight only for channels_last: with it oneDNN writes channels_last even for an NCHW input,
    # and the copy back to NCHW cost more than the weight reorder it saves (bench_conv_block.py).
    w = packer(math, xm.shape) if packer is not None and fmt == torch.channels_last else None
    if w is None:
        w = plain_weight(weight, packer).to(math)
    bm = bias.to(math) if bias is not None else None
    if residual is not None:
        rm = residual.to(math).contiguous(memory_format=fmt)
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            xm, rm, w, bm, padding, stride, dilation, groups, "add", None, None, [], None)
        if silu:
            y = F.silu(y, inplace=True)
    else:
        y = torch.ops.mkldnn._convolution_pointwise(
            xm, w, bm, padding, stride, dilation, groups, "swish" if silu else "none", [], None)
    y = y.to(out_dtype)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


class _Conv2dFn(torch.autograd.Function):
    """conv(x, w) + bias + residual through oneDNN; backward = the standard convolution backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        ctx.residual_shape = tuple(residual.shape) if residual is not None else None
        return _onednn_forward(x, weight, bias, residual, stride, padding, dilation, groups, False)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        if need_x or need_w or need_b:
            math = _math_dtype(x.dtype)
            fmt = _out_format(x, weight)
            gm = grad.to(math).contiguous(memory_format=fmt)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gm, x.to(math), weight.to(math), [weight.shape[0]] if has_bias else None, list(stride),
                list(padding), list(dilation), False, [0, 0], groups, [need_x, need_w, need_b and has_bias])
            gx = gx.to(x.dtype) if gx is not None else None
            gw = gw.to(weight.dtype) if gw is not None else None
            gb = gb.to(weight.dtype) if gb is not None else None
        gr = _sum_to(grad, ctx.residual_shape) if need_r else None
        return gx, gw, gb, gr, None, None, None, None


def _sum_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """The gradient of a broadcast residual: sum over the dimensions it was broadcast along."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True)


def _conv2d_cpu(x, weight, bias, stride, padding, dilation, groups, residual, silu, packer):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        y = _Conv2dFn.apply(x, plain_weight(weight, packer), bias, residual, stride, padding, dilation, groups)
        return F.silu(y) if silu else y
    return _onednn_forward(x, weight, bias, residual, stride, padding, dilation, groups, silu, packer)


def _cpu_reasons(x, weight, bias, stride, padding, dilation, groups, residual, silu, packer):
    out = onednn_reasons(x, weight, bias, residual)
    if x.dim() != 4:
        out.append(f"input is {x.dim()}-D; the oneDNN path runs batched 4-D input")
    if isinstance(padding, str):
        out.append(f"padding={padding!r} needs asymmetric padding (even kernel); oneDNN's op takes symmetric")
    if residual is not None and x.dim() == 4:
        n, c, r = x.shape[0], weight.shape[0], tuple(residual.shape)
        full = not isinstance(padding, str) and r == _out_shape(x, weight, stride, padding, dilation)
        per_nc = r[2:] == (1, 1) and r[0] in (1, n) and r[1] == c
        if not (full or per_nc):
            out.append(f"residual {r}: oneDNN fuses the output's shape or a ({n} or 1, {c}, 1, 1) broadcast only")
    return out


def _cpu_slower(x, weight, bias, stride, padding, dilation, groups, residual, silu, packer):
    """When automatic choice leaves the oneDNN path to eager F.conv2d (benchmarks/bench_conv_block.py; in
    training, the routing row's ``train_ref``, benchmarks/bench_train_ops.py)."""
    why = train_ref_reason("conv2d", x, weight, bias, residual)
    if why is not None:
        return why
    if x.dtype == torch.float32 and residual is None and not silu:
        return ("plain fp32 convolution: F.conv2d runs the same oneDNN kernel (0.97-0.99x measured) and there is "
                "nothing to fuse")
    return None


def _conv2d_ref_impl(x, weight, bias, stride, padding, dilation, groups, residual, silu, packer):
    return conv2d_ref(x, plain_weight(weight, packer), bias, stride, padding, dilation, groups, residual=residual,
                      silu=silu)


_op.register("ref")(_conv2d_ref_impl)
_op.register("cpu", _cpu_reasons, needs_backend=False, slower=_cpu_slower)(_conv2d_cpu)  # torch oneDNN: no _C


# ---------------------------------------------------------------------------------------------- public API

def _normalize(x, weight, bias, stride, padding, dilation, groups, residual):
    """Check the arguments like F.conv2d would, with clear messages, and turn them into int pairs."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("conv2d: x and weight must be tensors")
    if x.dim() not in (3, 4) or weight.dim() != 4:
        raise ValueError(f"conv2d: expected x of shape (N, C, H, W) or (C, H, W) and a 4-D weight; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"conv2d: x, weight and bias must share one dtype; got {x.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    if not isinstance(groups, int) or groups < 1 or x.shape[-3] != weight.shape[1] * groups \
            or weight.shape[0] % groups:
        raise ValueError(f"conv2d: x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups} (and out channels divisible by groups)")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"conv2d: stride and dilation must be >= 1, got {stride}, {dilation}")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            padding = tuple(t // 2 for t in total) if not any(t % 2 for t in total) else "same"
        else:
            raise ValueError(f"conv2d: padding must be an int, a pair, 'valid' or 'same'; got {padding!r}")
    else:
        padding = _pair(padding, "padding")
        if min(padding) < 0:
            raise ValueError(f"conv2d: padding must be >= 0, got {padding}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError("conv2d: residual must be a tensor or None")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv2d: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    return stride, padding, dilation


def _out_shape(x, weight, stride, padding, dilation):
    if isinstance(padding, str):  # 'same'
        return tuple(x.shape[:-3]) + (weight.shape[0],) + tuple(x.shape[-2:])
    hw = [(x.shape[-2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
          for i in range(2)]
    return tuple(x.shape[:-3]) + (weight.shape[0],) + tuple(hw)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None, silu=False,
            packer=None):
    x, weight, bias, residual = autocast_cast(x, weight, bias, residual)
    stride, padding, dilation = _normalize(x, weight, bias, stride, padding, dilation, groups, residual)
    if residual is not None:
        want = _out_shape(x, weight, stride, padding, dilation)
        try:
            ok = torch.broadcast_shapes(tuple(residual.shape), want) == want and residual.dim() == len(want)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"conv2d: residual must have the output's shape {want} or broadcast to it with the "
                             f"same number of dimensions (e.g. (N, C, 1, 1)); got {tuple(residual.shape)}")
    if x.dim() == 3:  # unbatched, as F.conv2d allows
        r = residual.unsqueeze(0) if residual is not None else None
        return _op(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, r, bool(silu), packer)[0]
    return _op(x, weight, bias, stride, padding, dilation, groups, residual, bool(silu), packer)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None, silu=False):
    """``silu?(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual?)`` in one pass.

    Arguments are F.conv2d's. ``residual`` (x's dtype; the output's shape, or broadcast to it such as a
    per-sample, per-channel ``(N, C, 1, 1)`` time-embedding term) is added to the convolution output; with ``silu=True`` SiLU is applied last. The output has torch's memory format (channels_last
    when x or weight is channels_last). Differentiable in x, weight, bias and residual.
    """
    return _conv2d(x, weight, bias, stride, padding, dilation, groups, residual=residual, silu=silu)


class Conv2d(PackedWeightMixin, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same arguments, defaults, parameter names and state_dict) on :func:`conv2d`.

    ``forward(input, residual=None, silu=False)``: the extra arguments fuse the skip add / SiLU. In inference
    (eval mode, no grad wanted) with channels_last input, the weight pre-packed for oneDNN (in the math dtype,
    for the input shape) replaces the plain one after its second call with one shape; reading ``weight``,
    ``state_dict``, ``.to()``, ``train()`` put the plain weight back exactly (:mod:`fastdiff.ops._packed`;
    ``pack_policy`` chooses ``"replace"``, ``"cache"`` or ``"off"``).
    """

    def _fd_key(self, math, x_shape) -> tuple:
        return (math, tuple(x_shape), self.stride, self.padding, self.dilation, self.groups)

    def _fd_make_pack(self, weight, math, x_shape):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to(math).contiguous().to_mkldnn(), list(self._fd_padding()), list(self.stride),
            list(self.dilation), self.groups, list(x_shape))

    def _fd_padding(self):
        return (0, 0) if self.padding_mode != "zeros" or isinstance(self.padding, str) else self.padding

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, silu: bool = False):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        else:
            padding = self.padding
        packer = self._fd_packer(input, residual) if not isinstance(padding, str) else None
        if packer is None:
            self._fd_restore(keep_pack=False)
        # the parameter itself (a placeholder while packed: the op asks the packer for the values it needs)
        weight = self._parameters["weight"]
        return _conv2d(input, weight, self.bias, self.stride, padding, self.dilation, self.groups,
                       residual=residual, silu=silu, packer=packer)
