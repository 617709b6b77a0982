// Row statistics shared by the CPU kernel bodies of layer_norm, rms_norm and layer_norm_modulate.
// Two passes over a row that sits in L1/L2 (D <= a few thousand): mean first, then the centred second moment,
// which stays accurate when |mean| >> std (a one-pass E[x^2] - E[x]^2 does not). -ffast-math lets the
// compiler vectorise the sums (reassociation).
#pragma once

#include "elem.h"
#include "fastdiff/math/norm.h"

template <class T>
FD_HD void fd_row_mean_rstd(const T* x, int64_t d, float eps, float* mean_out, float* rstd_out) {
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) s += fd_ld(x, j);
  const float m = s / static_cast<float>(d);
  float v = 0.f;
  for (int64_t j = 0; j < d; ++j) {
    const float t = fd_ld(x, j) - m;
    v += t * t;
  }
  *mean_out = m;
  *rstd_out = fd_rstd(v / static_cast<float>(d), eps);
}

template <class T>
FD_HD float fd_row_rms_rstd(const T* x, int64_t d, float eps) {
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) {
    const float t = fd_ld(x, j);
    s += t * t;
  }
  return fd_rstd(s / static_cast<float>(d), eps);
}
