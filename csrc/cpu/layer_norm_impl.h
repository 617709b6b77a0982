// Kernel bodies of LayerNorm over the last dimension, compiled once per ISA (see isa_begin.h).
// Math: fastdiff/math/norm.h. x, y, dy, dx: `rows` contiguous rows of d elements (fp32 or bf16 bits);
// w, b: fp32 vectors of d (or null); mean, rstd: fp32 per row (written by forward, read by backward).
#pragma once

#include "norm_row.h"

namespace fastdiff::cpu::FD_ISA {

template <class T, bool HasW, bool HasB>
static void ln_fwd_t(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t rows,
                     int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float m, rs;
    fd_row_mean_rstd(xr, d, eps, &m, &rs);
    mean[r] = m;
    rstd[r] = rs;
    for (int64_t j = 0; j < d; ++j) {
      const float xh = (fd_ld(xr, j) - m) * rs;
      fd_st(yr, j, fd_norm_affine(xh, HasW ? w[j] : 1.f, HasB ? b[j] : 0.f));
    }
  }
}

template <class T>
static void ln_fwd_d(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t rows,
                     int64_t d, float eps) {
  if (w && b) ln_fwd_t<T, true, true>(x, w, b, y, mean, rstd, rows, d, eps);
  else if (w) ln_fwd_t<T, true, false>(x, w, b, y, mean, rstd, rows, d, eps);
  else if (b) ln_fwd_t<T, false, true>(x, w, b, y, mean, rstd, rows, d, eps);
  else ln_fwd_t<T, false, false>(x, w, b, y, mean, rstd, rows, d, eps);
}

// dw_acc / db_acc (or null): this thread's fp32 accumulators of d elements, summed over threads by the caller.
template <class T, bool HasW, bool Acc>
static void ln_bwd_t(const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,
                     float* dw_acc, float* db_acc, int64_t rows, int64_t d) {
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dr = dx + r * d;
    const float m = mean[r], rs = rstd[r];
    float sg = 0.f, sgx = 0.f;
    for (int64_t j = 0; j < d; ++j) {
      const float g = fd_ld(gr, j) * (HasW ? w[j] : 1.f);
      sg += g;
      sgx += g * (fd_ld(xr, j) - m) * rs;
    }
    const float mg = sg * inv_d, mgx = sgx * inv_d;
    for (int64_t j = 0; j < d; ++j) {
      const float gy = fd_ld(gr, j), xh = (fd_ld(xr, j) - m) * rs;
      fd_st(dr, j, fd_layer_norm_grad_x(gy * (HasW ? w[j] : 1.f), xh, rs, mg, mgx));
      if (Acc) {
        dw_acc[j] += gy * xh;
        db_acc[j] += gy;
      }
    }
  }
}

template <class T>
static void ln_bwd_d(const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,
                     float* dw_acc, float* db_acc, int64_t rows, int64_t d) {
  const bool acc = dw_acc != nullptr;
  if (w && acc) ln_bwd_t<T, true, true>(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
  else if (w) ln_bwd_t<T, true, false>(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
  else if (acc) ln_bwd_t<T, false, true>(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
  else ln_bwd_t<T, false, false>(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
}

void layer_norm_fwd(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                    int64_t rows, int64_t d, float eps) { ln_fwd_d(x, w, b, y, mean, rstd, rows, d, eps); }
void layer_norm_fwd(const uint16_t* x, const float* w, const float* b, uint16_t* y, float* mean, float* rstd,
                    int64_t rows, int64_t d, float eps) { ln_fwd_d(x, w, b, y, mean, rstd, rows, d, eps); }
void layer_norm_bwd(const float* dy, const float* x, const float* w, const float* mean, const float* rstd,
                    float* dx, float* dw_acc, float* db_acc, int64_t rows, int64_t d) {
  ln_bwd_d(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
}
void layer_norm_bwd(const uint16_t* dy, const uint16_t* x, const float* w, const float* mean, const float* rstd,
                    uint16_t* dx, float* dw_acc, float* db_acc, int64_t rows, int64_t d) {
  ln_bwd_d(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rows, d);
}

}  // namespace fastdiff::cpu::FD_ISA
