// Kernel bodies of RMSNorm over the last dimension (diffusers' RMSNorm, SD3's q/k norm), compiled once per ISA.
// Math: fastdiff/math/norm.h. x, y, dy, dx: `rows` contiguous rows of d elements (fp32 or bf16 bits);
// w, b: fp32 vectors of d (or null); rstd: fp32 per row (written by forward, read by backward).
#pragma once

#include "norm_row.h"

namespace fastdiff::cpu::FD_ISA {

template <class T, bool HasW, bool HasB>
static void rms_fwd_t(const T* x, const float* w, const float* b, T* y, float* rstd, int64_t rows, int64_t d,
                      float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    const float rs = fd_row_rms_rstd(xr, d, eps);
    rstd[r] = rs;
    for (int64_t j = 0; j < d; ++j) {
      fd_st(yr, j, fd_norm_affine(fd_ld(xr, j) * rs, HasW ? w[j] : 1.f, HasB ? b[j] : 0.f));
    }
  }
}

template <class T, bool HasW, bool Acc>
static void rms_bwd_t(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_acc,
                      float* db_acc, int64_t rows, int64_t d) {
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dr = dx + r * d;
    const float rs = rstd[r];
    float sgx = 0.f;
    for (int64_t j = 0; j < d; ++j) sgx += fd_ld(gr, j) * (HasW ? w[j] : 1.f) * fd_ld(xr, j) * rs;
    const float mgx = sgx * inv_d;
    for (int64_t j = 0; j < d; ++j) {
      const float gy = fd_ld(gr, j), xh = fd_ld(xr, j) * rs;
      fd_st(dr, j, fd_rms_norm_grad_x(gy * (HasW ? w[j] : 1.f), xh, rs, mgx));
      if (Acc) {
        dw_acc[j] += gy * xh;
        db_acc[j] += gy;
      }
    }
  }
}

template <class T>
static void rms_fwd_d(const T* x, const float* w, const float* b, T* y, float* rstd, int64_t rows, int64_t d,
                      float eps) {
  if (w && b) rms_fwd_t<T, true, true>(x, w, b, y, rstd, rows, d, eps);
  else if (w) rms_fwd_t<T, true, false>(x, w, b, y, rstd, rows, d, eps);
  else if (b) rms_fwd_t<T, false, true>(x, w, b, y, rstd, rows, d, eps);
  else rms_fwd_t<T, false, false>(x, w, b, y, rstd, rows, d, eps);
}

template <class T>
static void rms_bwd_d(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_acc,
                      float* db_acc, int64_t rows, int64_t d) {
  const bool acc = dw_acc != nullptr;
  if (w && acc) rms_bwd_t<T, true, true>(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d);
  else if (w) rms_bwd_t<T, true, false>(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d);
  else if (acc) rms_bwd_t<T, false, true>(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d);
  else rms_bwd_t<T, false, false>(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d);
}

void rms_norm_fwd(const float* x, const float* w, const float* b, float* y, float* rstd, int64_t rows, int64_t d,
                  float eps) { rms_fwd_d(x, w, b, y, rstd, rows, d, eps); }
void rms_norm_fwd(const uint16_t* x, const float* w, const float* b, uint16_t* y, float* rstd, int64_t rows,
                  int64_t d, float eps) { rms_fwd_d(x, w, b, y, rstd, rows, d, eps); }
void rms_norm_bwd(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw_acc,
                  float* db_acc, int64_t rows, int64_t d) { rms_bwd_d(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d); }
void rms_norm_bwd(const uint16_t* dy, const uint16_t* x, const float* w, const float* rstd, uint16_t* dx,
                  float* dw_acc, float* db_acc, int64_t rows, int64_t d) {
  rms_bwd_d(dy, x, w, rstd, dx, dw_acc, db_acc, rows, d);
}

}  // namespace fastdiff::cpu::FD_ISA
