// Kernel bodies of the fused GroupNorm (+ residual, + SiLU), compiled once per ISA (see isa_begin.h).
// Math: fastdiff/math/group_norm.h. Arguments: group_norm_args.h. Threading and checks: group_norm.cpp.
//
// NCHW: one task per (sample, group). The group's cpg rows of n contiguous positions are reduced (one read),
// then normalised and written in one pass; at SD sizes the group (cpg * n values) still sits in L2 for that
// second read, so memory traffic is one read of x and one write of y, like a copy.
// Channels-last: a group's values are strided (cpg of every C), so the sums run along C in vectors for a chunk
// of positions (task = (sample, chunk)) into per-channel partials, the caller merges them into the group
// statistics, and a second pass applies the per-channel affine (+ SiLU) along C.
#pragma once

#include <stdlib.h>

#include "fastdiff/math/bf16.h"
#include "fastdiff/math/group_norm.h"
#include "group_norm_args.h"

namespace fastdiff::cpu::FD_ISA {
namespace gn {

static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) { return fd_bf16_to_float(p[i]); }
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = fd_float_to_bf16(v); }

// Only C library calls and code of this file below: an inline template of the C++ standard library
// instantiated here would be compiled for this ISA and could be picked by the linker for another (isa_begin.h).
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Heap scratch of `count` floats (malloc/free: plain C calls, see above), freed with the object.
struct Buf {
  float* p;
  explicit Buf(int64_t count) : p(static_cast<float*>(malloc(sizeof(float) * (count > 0 ? count : 1)))) {}
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// Reductions run in fp32 over blocks of this many values, the block sums are added in double: the fp32
// partial sums stay short (accurate) and the loop still vectorises.
constexpr int64_t kBlock = 4096;

// ---- NCHW rows -----------------------------------------------------------------------------------------------

// Shifted sums of v = x (+ r) + add over one row: s1 = sum(v - shift), s2 = sum((v - shift)^2), shift = v[0].
template <class T, bool RES>
static inline void row_sums(const T* x, const T* r, float add, int64_t n, float& shift, float& s1, float& s2) {
  shift = ld(x, 0) + (RES ? ld(r, 0) : 0.f) + add;
  const float off = add - shift;
  double d1 = 0, d2 = 0;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    float a1 = 0.f, a2 = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const float v = ld(x, i) + (RES ? ld(r, i) : 0.f) + off;
      a1 += v;
      a2 += v * v;
    }
    d1 += a1;
    d2 += a2;
  }
  s1 = static_cast<float>(d1);
  s2 = static_cast<float>(d2);
}

// y = act((x + r) * a + k) over one row.
template <class T, bool RES, bool SILU>
static inline void row_apply(const T* x, const T* r, float a, float k, int64_t n, T* y) {
  for (int64_t i = 0; i < n; ++i) {
    float z = (ld(x, i) + (RES ? ld(r, i) : 0.f)) * a + k;
    if (SILU) z = fd_silu(z);
    st(y, i, z);
  }
}

// Backward sums over one row, u = x + r, z = u * a + k, dz = dy * act'(z), v - mean = u + off:
// sdz = sum dz, sdzv = sum dz * (v - mean), sv = sum (v - mean).
template <class T, bool RES, bool SILU>
static inline void row_bwd_sums(const T* x, const T* r, const T* dy, float a, float k, float off, int64_t n,
                                float& sdz, float& sdzv, float& sv) {
  double d0 = 0, d1 = 0, d2 = 0;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const float u = ld(x, i) + (RES ? ld(r, i) : 0.f);
      const float dz = fd_gn_dz(ld(dy, i), u * a + k, SILU);
      const float v = u + off;
      a0 += dz;
      a1 += dz * v;
      a2 += v;
    }
    d0 += a0;
    d1 += a1;
    d2 += a2;
  }
  sdz = static_cast<float>(d0);
  sdzv = static_cast<float>(d1);
  sv = static_cast<float>(d2);
}

// dx = cd * dz + cb * u + cc over one row (z recomputed as u * a + k).
template <class T, bool RES, bool SILU>
static inline void row_bwd_apply(const T* x, const T* r, const T* dy, float a, float k, float cd, float cb, float cc,
                                 int64_t n, T* dx) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = ld(x, i) + (RES ? ld(r, i) : 0.f);
    const float dz = fd_gn_dz(ld(dy, i), u * a + k, SILU);
    st(dx, i, cd * dz + cb * u + cc);
  }
}

template <class T, bool RES, bool SILU>
static void fwd_rows(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  T* y = static_cast<T*>(p.y);
  const int64_t cpg = p.C / p.G, n = p.n;
  Buf scratch(6 * cpg);
  float* buf = scratch.p;
  float *s1 = buf, *s2 = buf + cpg, *shift = buf + 2 * cpg;
  for (int64_t bg = lo; bg < hi; ++bg) {
    const int64_t b = bg / p.G, c0 = (bg % p.G) * cpg;
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t row = (b * p.C + c0 + j) * n;
      const float add = p.rc ? p.rc[b * p.C + c0 + j] : 0.f;
      row_sums<T, RES>(x + row, RES ? r + row : nullptr, add, n, shift[j], s1[j], s2[j]);
    }
    float mean, rstd;
    fd_gn_group_stats(s1, s2, shift, cpg, n, p.eps, &mean, &rstd);
    p.mean[bg] = mean;
    p.rstd[bg] = rstd;
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t c = c0 + j, row = (b * p.C + c) * n;
      float a, k;
      fd_gn_channel_affine(mean, rstd, p.w ? p.w[c] : 1.f, p.bias ? p.bias[c] : 0.f, p.rc ? p.rc[b * p.C + c] : 0.f,
                           &a, &k);
      row_apply<T, RES, SILU>(x + row, RES ? r + row : nullptr, a, k, n, y + row);
    }
  }
}

template <class T, bool RES, bool SILU>
static void bwd_rows(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.y);
  const int64_t cpg = p.C / p.G, n = p.n;
  Buf scratch(6 * cpg);
  float* buf = scratch.p;
  float *sdz = buf, *sdzv = buf + cpg, *sv = buf + 2 * cpg, *av = buf + 3 * cpg, *kv = buf + 4 * cpg;
  for (int64_t bg = lo; bg < hi; ++bg) {
    const int64_t b = bg / p.G, c0 = (bg % p.G) * cpg;
    const float mean = p.mean[bg], rstd = p.rstd[bg];
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t c = c0 + j, row = (b * p.C + c) * n;
      const float rc = p.rc ? p.rc[b * p.C + c] : 0.f;
      fd_gn_channel_affine(mean, rstd, p.w ? p.w[c] : 1.f, p.bias ? p.bias[c] : 0.f, rc, &av[j], &kv[j]);
      row_bwd_sums<T, RES, SILU>(x + row, RES ? r + row : nullptr, dy + row, av[j], kv[j], rc - mean, n, sdz[j],
                                 sdzv[j], sv[j]);
    }
    float mg, mgx;
    fd_gn_bwd_group(p.w ? p.w + c0 : nullptr, sdz, sdzv, cpg, n, rstd, &mg, &mgx);
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t c = c0 + j, row = (b * p.C + c) * n;
      float cd, cb, cc;
      fd_gn_bwd_coefs(p.w ? p.w[c] : 1.f, p.rc ? p.rc[b * p.C + c] : 0.f, mean, rstd, mg, mgx, &cd, &cb, &cc);
      if (p.dw_part) p.dw_part[b * p.C + c] = rstd * sdzv[j];
      if (p.db_part) p.db_part[b * p.C + c] = sdz[j];
      if (p.drc) p.drc[b * p.C + c] = cd * sdz[j] + cb * sv[j] - static_cast<float>(n) * rstd * mg;
      row_bwd_apply<T, RES, SILU>(x + row, RES ? r + row : nullptr, dy + row, av[j], kv[j], cd, cb, cc, n, dx + row);
    }
  }
}

// ---- channels-last --------------------------------------------------------------------------------------------

// Task t = (b, j): per-channel shifted sums over positions [j * chunk, min(n, (j + 1) * chunk)) of sample b, into
// part[t * 2C + {0, C}]. The shift of channel c is v at position 0 of sample b (each task reads it; the task
// j == 0 also stores it for the caller).
template <class T, bool RES>
static void fwd_cl_sums(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  const int64_t C = p.C;
  Buf offbuf(C);
  float* off = offbuf.p;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const T* xb = x + b * p.n * C;
    const T* rb = RES ? r + b * p.n * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const float add = p.rc ? p.rc[b * C + c] : 0.f;
      const float shift = ld(xb, c) + (RES ? ld(rb, c) : 0.f) + add;
      if (j == 0) p.shift[b * C + c] = shift;
      off[c] = add - shift;
    }
    float* s1 = p.part + t * 2 * C;
    float* s2 = s1 + C;
    for (int64_t c = 0; c < 2 * C; ++c) s1[c] = 0.f;
    for (int64_t q = p0; q < p1; ++q) {
      const T* xq = xb + q * C;
      const T* rq = RES ? rb + q * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const float v = ld(xq, c) + (RES ? ld(rq, c) : 0.f) + off[c];
        s1[c] += v;
        s2[c] += v * v;
      }
    }
  }
}

// y = act((x + r) * ca[b, c] + ka[b, c]) over positions of tasks [lo, hi).
template <class T, bool RES, bool SILU>
static void fwd_cl_apply(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  T* y = static_cast<T*>(p.y);
  const int64_t C = p.C;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const float* a = p.ca + b * C;
    const float* k = p.ka + b * C;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t o = (b * p.n + q) * C;
      for (int64_t c = 0; c < C; ++c) {
        float z = (ld(x, o + c) + (RES ? ld(r, o + c) : 0.f)) * a[c] + k[c];
        if (SILU) z = fd_silu(z);
        st(y, o + c, z);
      }
    }
  }
}

// Backward sums per task into part[t * 3C + {0, C, 2C}] = sdz, sdzv, sv (see the math header); needs ca/ka
// (forward affine, to recompute z) and the group mean.
template <class T, bool RES, bool SILU>
static void bwd_cl_sums(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  const T* dy = static_cast<const T*>(p.dy);
  const int64_t C = p.C, cpg = C / p.G;
  Buf offbuf(C);
  float* off = offbuf.p;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const float* a = p.ca + b * C;
    const float* k = p.ka + b * C;
    for (int64_t c = 0; c < C; ++c) off[c] = (p.rc ? p.rc[b * C + c] : 0.f) - p.mean[b * p.G + c / cpg];
    float* s0 = p.part + t * 3 * C;
    float* s1 = s0 + C;
    float* s2 = s1 + C;
    for (int64_t c = 0; c < 3 * C; ++c) s0[c] = 0.f;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t o = (b * p.n + q) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float u = ld(x, o + c) + (RES ? ld(r, o + c) : 0.f);
        const float dz = fd_gn_dz(ld(dy, o + c), u * a[c] + k[c], SILU);
        const float v = u + off[c];
        s0[c] += dz;
        s1[c] += dz * v;
        s2[c] += v;
      }
    }
  }
}

template <class T, bool RES, bool SILU>
static void bwd_cl_apply(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.y);
  const int64_t C = p.C;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const float *a = p.ca + b * C, *k = p.ka + b * C, *cd = p.cd + b * C, *cb = p.cb + b * C, *cc = p.cc + b * C;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t o = (b * p.n + q) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float u = ld(x, o + c) + (RES ? ld(r, o + c) : 0.f);
        const float dz = fd_gn_dz(ld(dy, o + c), u * a[c] + k[c], SILU);
        st(dx, o + c, cd[c] * dz + cb[c] * u + cc[c]);
      }
    }
  }
}

// Pick the template instance for the run-time flags.
#define FD_GN_SELECT2(fn, T, p, lo, hi)                                      \
  do {                                                                       \
    if ((p).r) {                                                             \
      if ((p).silu) fn<T, true, true>(p, lo, hi); else fn<T, true, false>(p, lo, hi);   \
    } else {                                                                 \
      if ((p).silu) fn<T, false, true>(p, lo, hi); else fn<T, false, false>(p, lo, hi); \
    }                                                                        \
  } while (0)

}  // namespace gn

// Entry points (declared in group_norm.cpp). T: float (fp32) or uint16_t (bf16 bits).
#define FD_GN_ENTRY(T)                                                                                       \
  void group_norm_fwd_rows(const FdGnArgs& p, int64_t lo, int64_t hi, T*) { FD_GN_SELECT2(gn::fwd_rows, T, p, lo, hi); } \
  void group_norm_bwd_rows(const FdGnArgs& p, int64_t lo, int64_t hi, T*) { FD_GN_SELECT2(gn::bwd_rows, T, p, lo, hi); } \
  void group_norm_fwd_cl_sums(const FdGnArgs& p, int64_t lo, int64_t hi, T*) {                              \
    if (p.r) gn::fwd_cl_sums<T, true>(p, lo, hi); else gn::fwd_cl_sums<T, false>(p, lo, hi);               \
  }                                                                                                          \
  void group_norm_fwd_cl_apply(const FdGnArgs& p, int64_t lo, int64_t hi, T*) { FD_GN_SELECT2(gn::fwd_cl_apply, T, p, lo, hi); } \
  void group_norm_bwd_cl_sums(const FdGnArgs& p, int64_t lo, int64_t hi, T*) { FD_GN_SELECT2(gn::bwd_cl_sums, T, p, lo, hi); } \
  void group_norm_bwd_cl_apply(const FdGnArgs& p, int64_t lo, int64_t hi, T*) { FD_GN_SELECT2(gn::bwd_cl_apply, T, p, lo, hi); }

FD_GN_ENTRY(float)
FD_GN_ENTRY(uint16_t)

#undef FD_GN_ENTRY
#undef FD_GN_SELECT2

}  // namespace fastdiff::cpu::FD_ISA
