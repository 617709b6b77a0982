// adaLN modulation and gated residual of DiT / SD3 (MMDiT), shared by the CPU and CUDA kernels.
// x is (B, L, D); shift, scale and gate are (B, D), broadcast over the L tokens of their batch element.
//   modulate:             y   = x * (1 + scale) + shift
//   layer_norm_modulate:  y   = xhat * (1 + scale) + shift, xhat = LayerNorm(x) without affine (norm.h)
//                         (SD3's AdaLayerNormZero: norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None])
//   gate_residual:        out = x + gate * y
// Backward (sums run over the L tokens of one batch element):
//   modulate:             dx = dy * (1 + scale),  dshift = sum dy,  dscale = sum dy * x
//   layer_norm_modulate:  g = dy * (1 + scale), dx = LayerNorm backward of g (norm.h),
//                         dshift = sum dy, dscale = sum dy * xhat
//   gate_residual:        dx = dout,  dy = dout * gate,  dgate = sum dout * y
#pragma once

#include "fastdiff/hd.h"

FD_HD float fd_modulate(float x, float shift, float scale) { return x * (1.0f + scale) + shift; }

FD_HD float fd_gate_residual(float x, float gate, float y) { return x + gate * y; }
