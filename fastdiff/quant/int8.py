"""W8A8 inference: convolutions and linears through integer dot products with int32 accumulation.

What is quantised, and how:

* weights: int8, symmetric, one scale per output channel (``scale = max|w| / QMAX`` over the channel), made once
  by :func:`quantize_weight`; the int8 tensor (and oneDNN's packed copy of it) replace the float weight, so a
  quantised layer holds no float copy of its weight. The bias stays in float.
* activations: quantised dynamically at every call, from the tensor itself: per tensor, asymmetric uint8
  (``scale = (max - min) / 255`` over a range that contains 0, zero point ``round(-min / scale)``; see
  :func:`activation_qparams`).
* the product: oneDNN's int8 convolution / inner product (``torch.ops.onednn.qconv2d_pointwise`` /
  ``qlinear_pointwise``, the primitives torch's x86 quantisation lowers to) multiplies uint8 by int8 and
  accumulates in int32; the output is dequantised (``acc * x_scale * w_scale[c]``) and the bias added inside the
  primitive, in fp32. The residual add and the activation the float layer fused (``Conv2d(..., residual=,
  silu=)``, ``Linear(..., activation=, residual=)``) follow in fp32, and a bf16 model's output is rounded to bf16
  once at the end (oneDNN's own bf16 output measured 2-3 bf16 ulps off the exact result on an AVX2 CPU).
* everything else (norms, softmax, attention, the sampler) is untouched and runs in the model's float dtype.

Weights use 7 bits on CPUs without VNNI (``|q| <= 63``, :data:`WEIGHT_QMAX`): there the int8 dot product is
``vpmaddubsw``, which adds two uint8 x int8 products into a *saturating* int16, and 255 * 127 * 2 > 32767.
Measured on an AVX2-only CPU (oneDNN through torch 2.14.1): with full-range int8 weights the convolution's output
was 9% (relative max error) and the linear's 11% away from the exact integer result, from saturated pair sums;
with ``|q| <= 63`` (255 * 63 * 2 = 32130) both equal it to fp32 rounding (~1e-7). With VNNI (``vpdpbusd``
accumulates in int32) the full 8 bits are used.

Which layers stay in float (:data:`DEFAULT_SKIP`): the first and last convolutions (``conv_in`` reads the raw
noisy latent or pixels, ``conv_out`` writes the prediction the sampler integrates: their error goes straight into
the result, and they are a small share of the FLOPs) and the time / class embedding MLPs (two-row matmuls: no
speed to gain). The measured effect on the bundled Fashion-MNIST model and on SD1.5 is in the README.

Use :func:`quantize_int8` on a model (``pipe.quantize("int8")`` on a pipeline). The quantised layers are
inference only: no gradients, no ``.to(dtype)`` of the weights.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_SKIP", "WEIGHT_QMAX", "Int8Conv2d", "Int8Linear", "activation_qparams", "has_vnni",
           "quantize_activation", "quantize_int8", "quantize_weight", "quantized_layers"]


@functools.lru_cache(maxsize=None)
def has_vnni() -> bool:
    """True when the CPU has int8 dot products that accumulate in int32 (AVX512-VNNI or AVX-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# The largest weight magnitude: 127 where int32 dot products exist, 63 (7 bits) where vpmaddubsw's int16 pair
# sums would saturate (see the module docstring).
WEIGHT_QMAX = 127 if has_vnni() else 63

# Module paths (a path covers the modules under it) that quantize_int8 leaves in float unless told otherwise:
# the first and last layers of the UNets and the MMDiT, and the time / class / pooled-text embedding MLPs.
DEFAULT_SKIP = ("conv_in", "conv_out", "time_embedding", "class_embedding", "time_text_embed", "pos_embed",
                "proj_out")

_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def quantize_weight(w: torch.Tensor, qmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel): symmetric, ``q = round(w / scale)`` in ``[-qmax, qmax]``,
    ``scale = max|w[c]| / qmax`` (1 for an all-zero channel)."""
    qmax = WEIGHT_QMAX if qmax is None else qmax
    # fp64 once per weight: w / scale in fp32 can land on the other side of a .5 tie (full 8-bit range)
    wd = w.detach().double()
    amax = wd.flatten(1).abs().amax(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(wd / scale.view(-1, *([1] * (w.dim() - 1)))).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale.float()


def activation_qparams(x: torch.Tensor) -> tuple[float, int]:
    """(scale, zero point) of asymmetric per-tensor uint8 quantisation of ``x``: the range ``[min, max]``
    widened to contain 0, split into 255 steps; the zero point is the integer that stands for 0.0 (so zero
    padding stays exactly zero)."""
    lo, hi = torch.aminmax(x.detach())
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise FloatingPointError("int8: the activation holds NaN/inf; it cannot be quantised")
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return 1.0, 0
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp


def quantize_activation(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zp, 0, 255)`` (round half to even, in fp32) as a uint8 tensor in x's memory
    format."""
    q = x.float() if x.dtype != torch.float32 else x.clone(memory_format=torch.preserve_format)
    return q.mul_(1.0 / scale).round_().add_(zp).clamp_(0, 255).to(torch.uint8)


def _zeros_i64(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


class _Int8Base(nn.Module):
    """What the int8 layers share: the int8 weight and its scales (buffers: they are in ``state_dict``), the
    float bias, the float dtype the layer outputs, and oneDNN's packed weight built on first use."""

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, scale = quantize_weight(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", _zeros_i64(q.shape[0]), persistent=False)
        self.dtype = weight.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._packed = None

    def _apply(self, fn, recurse=True):
        # .to(device) / .to(dtype) of the model must not turn the int8 weight into floats nor round the fp32
        # scales and bias; the packed copy is rebuilt on the next call.
        self._packed = None
        q, s = self.weight_int8, self.weight_scale
        b = None if self.bias is None else self.bias.data
        out = super()._apply(fn, recurse)
        dev = self.weight_scale.device
        if self.weight_int8.dtype != torch.int8:
            self.weight_int8 = q.to(dev)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = s.to(dev)
        if b is not None and self.bias.dtype != torch.float32:
            self.bias.data = b.to(dev)
        return out

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_packed"] = None  # an opaque oneDNN tensor: rebuilt on demand
        return state


class Int8Conv2d(_Int8Base):
    """An int8 stand-in for :class:`fastdiff.ops.Conv2d` / ``nn.Conv2d`` (zero padding, groups 1):
    ``forward(input, residual=None, silu=False)`` computes ``silu?(conv(x, w) + bias + residual?)`` with the
    weight and the input quantised as the module docstring says."""

    groups, padding_mode = 1, "zeros"  # the only ones it takes (nn.Conv2d's attributes, for code that checks them)

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.groups != 1:
            raise ValueError("Int8Conv2d: zero padding given as numbers and groups=1 only")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self._setup(conv.weight, conv.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8 weights (|q| <= {WEIGHT_QMAX}), out {self.dtype}")

    def _packed_weight(self, x_shape) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(
                self.weight_int8, self.weight_scale, 1.0, 0, list(self.stride), list(self.padding),
                list(self.dilation), 1, list(x_shape))
        return self._packed

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, silu: bool = False):
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(f"Int8Conv2d: expected input (N, {self.in_channels}, H, W), got {tuple(input.shape)}")
        x = input.contiguous(memory_format=torch.channels_last)
        scale, zp = activation_qparams(x)
        qx = quantize_activation(x, scale, zp)
        y = torch.ops.onednn.qconv2d_pointwise(
            qx, scale, zp, self._packed_weight(qx.shape), self.weight_scale, self.weight_zero_point, self.bias,
            list(self.stride), list(self.padding), list(self.dilation), 1, 1.0, 0, torch.float32, "none", [], "")
        if residual is not None:
            y = y.add_(residual)
        if silu:
            y = F.silu(y, inplace=True)
        return y.to(self._out_dtype(input))


class Int8Linear(_Int8Base):
    """An int8 stand-in for :class:`fastdiff.ops.Linear` / ``nn.Linear``:
    ``forward(input, activation=None, residual=None)`` computes ``act?(x @ w.T + bias + residual?)``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.weight, linear.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights "
                f"(|q| <= {WEIGHT_QMAX}), out {self.dtype}")

    def _packed_weight(self, rows: int) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, [max(rows, 1), self.in_features])
        return self._packed

    def forward(self, input: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None):
        if input.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: expected input (..., {self.in_features}), got {tuple(input.shape)}")
        if activation is not None and activation not in _ACT:
            raise ValueError(f"Int8Linear: activation must be one of {(None,) + tuple(_ACT)}, got {activation!r}")
        x = input.reshape(-1, self.in_features)
        scale, zp = activation_qparams(x)
        qx = quantize_activation(x.contiguous(), scale, zp)
        y = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zp, self._packed_weight(qx.shape[0]), self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, torch.float32, "none", [], "")
        y = y.reshape(*input.shape[:-1], self.out_features)
        if residual is not None:
            y = y.add_(residual)
        if activation is not None:
            y = _ACT[activation](y)
        return y.to(self._out_dtype(input))


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _convertible(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.groups == 1
    return isinstance(m, nn.Linear)


def quantize_int8(model: nn.Module, *, skip=DEFAULT_SKIP) -> nn.Module:
    """Replace every ``nn.Conv2d`` (zero padding, groups 1) and ``nn.Linear`` of ``model`` (fastdiff's
    :class:`~fastdiff.ops.Conv2d` / :class:`~fastdiff.ops.Linear` included) by :class:`Int8Conv2d` /
    :class:`Int8Linear`, in place, except those whose name (or a part of it) is in ``skip``. The float weights
    of the replaced layers are dropped. Returns ``model`` in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8: model must be an nn.Module, got {type(model).__name__}")
    todo = [(name, m) for name, m in model.named_modules()
            if name and _convertible(m) and not _skipped(name, skip)]
    with_lora = [name for name, m in todo if len(getattr(m, "lora_adapters", ()))]
    if with_lora:  # checked before any layer is replaced: the model is left as it was
        raise ValueError(f"quantize_int8: {len(with_lora)} layer(s) carry LoRA side paths ({with_lora[0]}, ...); "
                         "quantise first, then load the LoRA (it runs as a float side path beside the int8 layers)")
    for name, m in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if m.weight.device.type != "cpu":
            raise ValueError(f"quantize_int8: {name} is on {m.weight.device}; the int8 path runs on the CPU")
        new = Int8Conv2d(m) if isinstance(m, nn.Conv2d) else Int8Linear(m)
        setattr(parent, attr, new)
    return model.eval()


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the int8 layers of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
