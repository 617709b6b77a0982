// Kernel bodies of GEGLU, compiled once per ISA (see isa_begin.h). Math: fastdiff/math/gelu.h.
// Rows are contiguous: x row r is [a (h values) | g (h values)], y/dy row r has h values.
#pragma once

#include "elem.h"
#include "fastdiff/math/gelu.h"

namespace fastdiff::cpu::FD_ISA {

template <class T>
static void geglu_fwd_t(const T* x, T* y, int64_t rows, int64_t h) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = x + r * 2 * h;
    const T* g = a + h;
    T* o = y + r * h;
    for (int64_t j = 0; j < h; ++j) fd_st(o, j, fd_ld(a, j) * fd_gelu(fd_ld(g, j)));
  }
}

// dy: upstream gradient (rows x h); x: the forward input; dx: rows x 2h ([da | dg]).
template <class T>
static void geglu_bwd_t(const T* dy, const T* x, T* dx, int64_t rows, int64_t h) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = x + r * 2 * h;
    const T* g = a + h;
    const T* d = dy + r * h;
    T* da = dx + r * 2 * h;
    T* dg = da + h;
    for (int64_t j = 0; j < h; ++j) {
      const float gj = fd_ld(g, j), dj = fd_ld(d, j);
      fd_st(da, j, fd_geglu_grad_a(dj, gj));
      fd_st(dg, j, fd_geglu_grad_g(dj, fd_ld(a, j), gj));
    }
  }
}

void geglu_fwd(const float* x, float* y, int64_t rows, int64_t h) { geglu_fwd_t(x, y, rows, h); }
void geglu_fwd(const uint16_t* x, uint16_t* y, int64_t rows, int64_t h) { geglu_fwd_t(x, y, rows, h); }
void geglu_bwd(const float* dy, const float* x, float* dx, int64_t rows, int64_t h) {
  geglu_bwd_t(dy, x, dx, rows, h);
}
void geglu_bwd(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t rows, int64_t h) {
  geglu_bwd_t(dy, x, dx, rows, h);
}

}  // namespace fastdiff::cpu::FD_ISA
