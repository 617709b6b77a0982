// Per-element math of LayerNorm and RMSNorm over the last dimension (D), shared by the CPU and CUDA kernels.
// Forward, per row of D elements x_i:
//   LayerNorm: mean = sum(x)/D, var = sum((x-mean)^2)/D (biased, as F.layer_norm), rstd = 1/sqrt(var + eps),
//              xhat = (x - mean) * rstd,  y = xhat * w + b
//   RMSNorm:   rstd = 1/sqrt(sum(x^2)/D + eps),  xhat = x * rstd,  y = xhat * w (+ b)   (diffusers' RMSNorm)
// Backward with g_i = dy_i * w_i (the gradient reaching xhat):
//   LayerNorm: dx_i = rstd * (g_i - mean(g) - xhat_i * mean(g * xhat))
//   RMSNorm:   dx_i = rstd * (g_i - xhat_i * mean(g * xhat))            (no mean term: x is not centred)
//   both:      dw = sum over rows of dy * xhat,  db = sum over rows of dy
// The row reductions are the kernels' business (two passes over a row that sits in cache: more accurate
// than a one-pass E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std).
#pragma once

#include <math.h>

#include "fastdiff/hd.h"

FD_HD float fd_rstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

FD_HD float fd_norm_affine(float xhat, float w, float b) { return xhat * w + b; }

FD_HD float fd_layer_norm_grad_x(float g, float xhat, float rstd, float mean_g, float mean_gxhat) {
  return rstd * (g - mean_g - xhat * mean_gxhat);
}

FD_HD float fd_rms_norm_grad_x(float g, float xhat, float rstd, float mean_gxhat) {
  return rstd * (g - xhat * mean_gxhat);
}
