// Kernel bodies of the adaLN ops (modulate, layer_norm_modulate, gate_residual), compiled once per ISA.
// Math: fastdiff/math/modulate.h and norm.h. Row tensors (x, y, dy, dx, out) are B*L contiguous rows of D
// elements (fp32 or bf16 bits); shift/scale/gate are fp32 (B, D); every function handles rows [r0, r1), and row r
// belongs to batch element r / L. acc (or null): this thread's fp32 accumulators, summed over threads by the
// caller, laid out [first gradient (B*D) | second gradient (B*D)].
#pragma once

#include "fastdiff/math/modulate.h"
#include "norm_row.h"

namespace fastdiff::cpu::FD_ISA {

template <class T>
static void modulate_fwd_t(const T* x, const float* shift, const float* scale, T* y, int64_t r0, int64_t r1,
                           int64_t L, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* sh = shift + (r / L) * D;
    const float* sc = scale + (r / L) * D;
    const T* xr = x + r * D;
    T* yr = y + r * D;
    for (int64_t j = 0; j < D; ++j) fd_st(yr, j, fd_modulate(fd_ld(xr, j), sh[j], sc[j]));
  }
}

// dx = dy * (1 + scale); acc: [dshift += dy | dscale += dy * x].
template <class T, bool Acc>
static void modulate_bwd_t(const T* dy, const T* x, const float* scale, T* dx, float* acc, int64_t B, int64_t r0,
                           int64_t r1, int64_t L, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / L;
    const float* sc = scale + b * D;
    const T* gr = dy + r * D;
    const T* xr = x + r * D;
    T* dr = dx + r * D;
    for (int64_t j = 0; j < D; ++j) {
      const float g = fd_ld(gr, j);
      fd_st(dr, j, g * (1.f + sc[j]));
      if (Acc) {
        acc[b * D + j] += g;
        acc[(B + b) * D + j] += g * fd_ld(xr, j);
      }
    }
  }
}

template <class T>
static void ln_modulate_fwd_t(const T* x, const float* shift, const float* scale, T* y, float* mean, float* rstd,
                              int64_t r0, int64_t r1, int64_t L, int64_t D, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* sh = shift + (r / L) * D;
    const float* sc = scale + (r / L) * D;
    const T* xr = x + r * D;
    T* yr = y + r * D;
    float m, rs;
    fd_row_mean_rstd(xr, D, eps, &m, &rs);
    mean[r] = m;
    rstd[r] = rs;
    for (int64_t j = 0; j < D; ++j) fd_st(yr, j, fd_modulate((fd_ld(xr, j) - m) * rs, sh[j], sc[j]));
  }
}

// g = dy * (1 + scale) is the gradient at xhat; dx by the LayerNorm backward; acc: [dshift | dscale += dy*xhat].
template <class T, bool Acc>
static void ln_modulate_bwd_t(const T* dy, const T* x, const float* scale, const float* mean, const float* rstd,
                              T* dx, float* acc, int64_t B, int64_t r0, int64_t r1, int64_t L, int64_t D) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / L;
    const float* sc = scale + b * D;
    const T* gr = dy + r * D;
    const T* xr = x + r * D;
    T* dr = dx + r * D;
    const float m = mean[r], rs = rstd[r];
    float sg = 0.f, sgx = 0.f;
    for (int64_t j = 0; j < D; ++j) {
      const float g = fd_ld(gr, j) * (1.f + sc[j]);
      sg += g;
      sgx += g * (fd_ld(xr, j) - m) * rs;
    }
    const float mg = sg * inv_d, mgx = sgx * inv_d;
    for (int64_t j = 0; j < D; ++j) {
      const float gy = fd_ld(gr, j), xh = (fd_ld(xr, j) - m) * rs;
      fd_st(dr, j, fd_layer_norm_grad_x(gy * (1.f + sc[j]), xh, rs, mg, mgx));
      if (Acc) {
        acc[b * D + j] += gy;
        acc[(B + b) * D + j] += gy * xh;
      }
    }
  }
}

template <class T>
static void gate_residual_fwd_t(const T* x, const float* gate, const T* y, T* out, int64_t r0, int64_t r1, int64_t L,
                                int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gt = gate + (r / L) * D;
    const T* xr = x + r * D;
    const T* yr = y + r * D;
    T* o = out + r * D;
    for (int64_t j = 0; j < D; ++j) fd_st(o, j, fd_gate_residual(fd_ld(xr, j), gt[j], fd_ld(yr, j)));
  }
}

// dy = dout * gate; acc: [dgate += dout * y] (B*D).
template <class T, bool Acc>
static void gate_residual_bwd_t(const T* dout, const float* gate, const T* y, T* dy, float* acc, int64_t r0,
                                int64_t r1, int64_t L, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / L;
    const float* gt = gate + b * D;
    const T* gr = dout + r * D;
    const T* yr = y + r * D;
    T* dr = dy + r * D;
    for (int64_t j = 0; j < D; ++j) {
      const float g = fd_ld(gr, j);
      fd_st(dr, j, g * gt[j]);
      if (Acc) acc[b * D + j] += g * fd_ld(yr, j);
    }
  }
}

#define FD_MOD_DEFINE(T)                                                                                       \
  void modulate_fwd(const T* x, const float* sh, const float* sc, T* y, int64_t r0, int64_t r1, int64_t L,     \
                    int64_t D) { modulate_fwd_t(x, sh, sc, y, r0, r1, L, D); }                                 \
  void modulate_bwd(const T* dy, const T* x, const float* sc, T* dx, float* acc, int64_t B, int64_t r0,        \
                    int64_t r1, int64_t L, int64_t D) {                                                        \
    if (acc) modulate_bwd_t<T, true>(dy, x, sc, dx, acc, B, r0, r1, L, D);                                     \
    else modulate_bwd_t<T, false>(dy, x, sc, dx, acc, B, r0, r1, L, D);                                        \
  }                                                                                                            \
  void layer_norm_modulate_fwd(const T* x, const float* sh, const float* sc, T* y, float* mean, float* rstd,    \
                               int64_t r0, int64_t r1, int64_t L, int64_t D, float eps) {                      \
    ln_modulate_fwd_t(x, sh, sc, y, mean, rstd, r0, r1, L, D, eps);                                            \
  }                                                                                                            \
  void layer_norm_modulate_bwd(const T* dy, const T* x, const float* sc, const float* mean, const float* rstd, \
                               T* dx, float* acc, int64_t B, int64_t r0, int64_t r1, int64_t L, int64_t D) {   \
    if (acc) ln_modulate_bwd_t<T, true>(dy, x, sc, mean, rstd, dx, acc, B, r0, r1, L, D);                      \
    else ln_modulate_bwd_t<T, false>(dy, x, sc, mean, rstd, dx, acc, B, r0, r1, L, D);                         \
  }                                                                                                            \
  void gate_residual_fwd(const T* x, const float* gate, const T* y, T* out, int64_t r0, int64_t r1, int64_t L, \
                         int64_t D) { gate_residual_fwd_t(x, gate, y, out, r0, r1, L, D); }                    \
  void gate_residual_bwd(const T* dout, const float* gate, const T* y, T* dy, float* acc, int64_t r0,          \
                         int64_t r1, int64_t L, int64_t D) {                                                   \
    if (acc) gate_residual_bwd_t<T, true>(dout, gate, y, dy, acc, r0, r1, L, D);                               \
    else gate_residual_bwd_t<T, false>(dout, gate, y, dy, acc, r0, r1, L, D);                                  \
  }

FD_MOD_DEFINE(float)
FD_MOD_DEFINE(uint16_t)
#undef FD_MOD_DEFINE

}  // namespace fastdiff::cpu::FD_ISA
