// Per-element and per-group math of the fused GroupNorm (+ pre-norm residual add, + SiLU), shared by the CPU
// kernels (csrc/cpu/group_norm_impl.h) and the CUDA kernels (csrc/cuda/group_norm.cu).
//
// Forward, for one sample b and one group g of cpg channels with n positions each (N = cpg * n values):
//   v      = x + r + rc[b, c]      r: optional full residual (like x); rc: optional per-(b, c) residual, e.g.
//                                  the ResBlock's time embedding broadcast over the positions
//   mean   = sum(v) / N,  var = sum((v - mean)^2) / N   (biased, as F.group_norm), rstd = 1 / sqrt(var + eps)
//   z      = (v - mean) * rstd * w[c] + bias[c]  =  (x + r) * a[c] + k[c]   with the per-channel affine
//            a[c] = rstd * w[c],  k[c] = bias[c] + (rc[b, c] - mean) * a[c]          (fd_gn_channel_affine)
//   y      = silu(z) = z * sigmoid(z)  when fused, else z
// Statistics always in fp32. Each channel is first reduced to shifted sums s1 = sum(v - shift), s2 =
// sum((v - shift)^2) with shift = one of the channel's own values (so s2 - s1^2/n does not cancel
// catastrophically when |mean| >> std); channels are then merged exactly (Chan et al.): the group's M2 is
// sum_c M2_c + n * sum_c (mean_c - mean)^2.                                                  (fd_gn_group_stats)
//
// Backward, with dz = dy * silu'(z) (or dy), xhat = (v - mean) * rstd, the gradient reaching xhat is
// gh = dz * w[c], and
//   dv = rstd * (gh - mean_N(gh) - xhat * mean_N(gh * xhat))
// which, from the per-channel sums sdz[c] = sum(dz), sdzv[c] = sum(dz * (v - mean)), sv[c] = sum(v - mean),
// becomes one affine map per channel                                                       (fd_gn_bwd_coefs)
//   dx = dr = ca[c] * dz + cb * (x + r) + cc[c],   ca[c] = rstd * w[c],   cb = -rstd^2 * Mgx,
//   cc[c] = -rstd * Mg - cb * mean + cb * rc[c],   Mg = sum_c w[c] sdz[c] / N,  Mgx = rstd sum_c w[c] sdzv[c] / N
//   dw[c] += rstd * sdzv[c],   dbias[c] += sdz[c],   drc[b, c] = sum over positions of dv
//                                                    = ca[c] * sdz[c] + cb * sv[c] - n * rstd * Mg
#pragma once

#include <math.h>
#include <stdint.h>

#include "fastdiff/hd.h"

FD_HD float fd_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

FD_HD float fd_silu(float z) { return z / (1.0f + expf(-z)); }

// d silu(z) / dz = s * (1 + z * (1 - s)),  s = sigmoid(z)
FD_HD float fd_silu_grad(float z) {
  const float s = fd_sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

// Mean and rstd of one group from the per-channel shifted sums (see the header comment).
// s1, s2, shift: cpg values each; n: positions per channel.
FD_HD void fd_gn_group_stats(const float* s1, const float* s2, const float* shift, int64_t cpg, int64_t n,
                             float eps, float* mean_out, float* rstd_out) {
  const float inv_n = 1.0f / static_cast<float>(n);
  float mean = 0.0f;
  for (int64_t c = 0; c < cpg; ++c) mean += shift[c] + s1[c] * inv_n;
  mean /= static_cast<float>(cpg);
  float m2 = 0.0f;
  for (int64_t c = 0; c < cpg; ++c) {
    const float mc = shift[c] + s1[c] * inv_n;
    const float m2c = s2[c] - s1[c] * s1[c] * inv_n;
    m2 += (m2c > 0.0f ? m2c : 0.0f) + static_cast<float>(n) * (mc - mean) * (mc - mean);
  }
  const float var = m2 / (static_cast<float>(n) * static_cast<float>(cpg));
  *mean_out = mean;
  *rstd_out = 1.0f / sqrtf(var + eps);
}

// z = (x + r) * a + k for one channel (rc: that channel's per-(b, c) residual, 0 if none).
FD_HD void fd_gn_channel_affine(float mean, float rstd, float w, float bias, float rc, float* a, float* k) {
  *a = rstd * w;
  *k = bias + (rc - mean) * (*a);
}

// Group-wide part of the backward: Mg and Mgx from the per-channel sums (w == nullptr: weight 1).
FD_HD void fd_gn_bwd_group(const float* w, const float* sdz, const float* sdzv, int64_t cpg, int64_t n, float rstd,
                           float* mg, float* mgx) {
  float g = 0.0f, gx = 0.0f;
  for (int64_t c = 0; c < cpg; ++c) {
    const float wc = w != nullptr ? w[c] : 1.0f;
    g += wc * sdz[c];
    gx += wc * sdzv[c];
  }
  const float inv_count = 1.0f / (static_cast<float>(n) * static_cast<float>(cpg));
  *mg = g * inv_count;
  *mgx = rstd * gx * inv_count;
}

// Per-channel coefficients of dx = ca * dz + cb * (x + r) + cc.
FD_HD void fd_gn_bwd_coefs(float w, float rc, float mean, float rstd, float mg, float mgx, float* ca, float* cb,
                           float* cc) {
  *ca = rstd * w;
  *cb = -rstd * rstd * mgx;
  *cc = -rstd * mg - (*cb) * mean + (*cb) * rc;
}

// dz from dy and the recomputed pre-activation z.
FD_HD float fd_gn_dz(float dy, float z, bool silu) { return silu ? dy * fd_silu_grad(z) : dy; }
