"""Quantised inference: :mod:`fastdiff.quant.int8` (W8A8 convolutions and linears on oneDNN's int8 kernels)."""
from fastdiff.quant.int8 import DEFAULT_SKIP, Int8Conv2d, Int8Linear, quantize_int8, quantized_layers

__all__ = ["DEFAULT_SKIP", "Int8Conv2d", "Int8Linear", "quantize_int8", "quantized_layers"]
