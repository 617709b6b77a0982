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

#if defined(FD_ISA_IS_AVX512) || defined(FD_ISA_IS_AVX2)
#include <immintrin.h>
#endif

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

// The exp polynomial of the vector paths below: exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln2 (ln2 split
// in hi + lo), e^r = 1 + r + r^2 P(r) with Cephes' expf polynomial P (coefficients highest degree first). LOWP
// (bf16 output) uses a one-part ln2 and P's last three terms.
namespace expc {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718056f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr int kLowpFirst = 3;  // LOWP starts at kP[3]
}  // namespace expc

#if defined(FD_ISA_IS_AVX512)
// ---- explicit AVX-512 versions of the forward hot loops --------------------------------------------------------
// GCC vectorises the generic loops, but calls libmvec's expf and divides for the sigmoid, and keeps one
// accumulator chain in the sums; these versions use an inline exp (Cephes polynomial + vscalefps, which also
// handles overflow and underflow), rcp14 + one Newton step for 1 / (1 + e), two accumulators, and convert bf16
// in registers (widen: shift left 16; narrow: round to nearest even, NaN kept quiet).
namespace v512 {

static inline __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 ld(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 ld(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));  // quiet NaN, not rounded
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
static inline void st(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void st(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
static inline void st(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
static inline void st(uint16_t* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// exp(x) = 2^n * e^r, n = round(x / ln2), r = x - n ln2, e^r by Cephes' expf polynomial (degree 6, ~1 ulp
// of fp32). LOWP (bf16 output, 8-bit mantissa): one-part ln2 and degree 4 (relative error ~4e-5, far below half
// a bf16 ulp, 2e-3): the SiLU is the compute bottleneck of the bf16 pass.
template <bool LOWP>
static inline __m512 exp(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(expc::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 y, r;
  if (LOWP) {
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(expc::kLn2), x);
  } else {
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(expc::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(expc::kLn2Lo), r);
  }
  constexpr int first = LOWP ? expc::kLowpFirst : 0;
  y = _mm512_set1_ps(expc::kP[first]);
  for (int k = first + 1; k < 6; ++k) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(expc::kP[k]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// silu(z) = z / (1 + exp(-z)); the reciprocal by rcp14 (relative error 2^-14: enough for bf16 output) plus,
// for fp32, one Newton step (~1 ulp short of a division).
template <bool LOWP>
static inline __m512 silu(__m512 z) {
  // -z clamped to 88 keeps d finite (an infinite d would turn the Newton step into inf * 0 = NaN); for
  // z < -88 the result is then z * ~0 = -0 as it should. min(NaN, 88) = 88, but z * q keeps a NaN z NaN.
  const __m512 e = exp<LOWP>(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), _mm512_set1_ps(88.0f)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  __m512 q = _mm512_rcp14_ps(d);
  if (!LOWP) q = _mm512_mul_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(z, q);
}

// bf16 output (uint16_t) may use the cheaper SiLU.
template <class T> constexpr bool lowp() { return sizeof(T) == 2; }

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <class T, bool RES>
static inline void row_sums(const T* x, const T* r, float off, int64_t n, double& d1, double& d2) {
  const __m512 o = _mm512_set1_ps(off);
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    __m512 a1 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps();
    int64_t i = lo;
    for (; i + 32 <= hi; i += 32) {
      __m512 v = _mm512_add_ps(ld(x + i), o), u = _mm512_add_ps(ld(x + i + 16), o);
      if (RES) v = _mm512_add_ps(v, ld(r + i)), u = _mm512_add_ps(u, ld(r + i + 16));
      a1 = _mm512_add_ps(a1, v), b1 = _mm512_add_ps(b1, u);
      a2 = _mm512_fmadd_ps(v, v, a2), b2 = _mm512_fmadd_ps(u, u, b2);
    }
    for (; i < hi; i += 16) {
      const __mmask16 m = (hi - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hi - i)) - 1);
      __m512 v = _mm512_maskz_add_ps(m, ld(x + i, m), o);
      if (RES) v = _mm512_add_ps(v, ld(r + i, m));
      a1 = _mm512_add_ps(a1, v);
      a2 = _mm512_fmadd_ps(v, v, a2);
    }
    d1 += hsum(_mm512_add_ps(a1, b1));
    d2 += hsum(_mm512_add_ps(a2, b2));
  }
}

template <class T, bool RES, bool SILU>
static inline __m512 affine(const T* x, const T* r, __m512 a, __m512 k, int64_t i) {
  __m512 u = ld(x + i);
  if (RES) u = _mm512_add_ps(u, ld(r + i));
  const __m512 z = _mm512_fmadd_ps(u, a, k);
  return SILU ? silu<lowp<T>()>(z) : z;
}

template <class T, bool RES, bool SILU>
static inline void row_apply(const T* x, const T* r, float af, float kf, int64_t n, T* y) {
  const __m512 a = _mm512_set1_ps(af), k = _mm512_set1_ps(kf);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 z0 = affine<T, RES, SILU>(x, r, a, k, i), z1 = affine<T, RES, SILU>(x, r, a, k, i + 16);
    st(y + i, z0), st(y + i + 16, z1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = (n - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    __m512 u = ld(x + i, m);
    if (RES) u = _mm512_add_ps(u, ld(r + i, m));
    __m512 z = _mm512_fmadd_ps(u, a, k);
    if (SILU) z = silu<lowp<T>()>(z);
    st(y + i, z, m);
  }
}

// Channels-last, positions [0, np) of one chunk (row stride C): s1[c] = sum v, s2[c] = sum v^2, v = x + r + off[c].
// Channel blocks of 64 are the outer loop so the 8 accumulators stay in registers across the positions (a
// per-position loop over all C would load and store s1 / s2 for every vector: store-bound, ~4x the NCHW cost).
template <class T, bool RES>
static inline void cl_sums_chunk(const T* x, const T* r, const float* off, int64_t C, int64_t np, float* s1,
                                 float* s2) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    __mmask16 m[4];
    __m512 o[4], a1[4], a2[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t left = C - c0 - 16 * j;
      m[j] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
      o[j] = _mm512_maskz_loadu_ps(m[j], off + c0 + 16 * j);
      a1[j] = _mm512_setzero_ps(), a2[j] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < np; ++q) {
      const T* xq = x + q * C + c0;
      const T* rq = RES ? r + q * C + c0 : nullptr;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m512 v = _mm512_maskz_add_ps(m[j], ld(xq + 16 * j, m[j]), o[j]);
        if (RES) v = _mm512_add_ps(v, ld(rq + 16 * j, m[j]));
        a1[j] = _mm512_add_ps(a1[j], v);
        a2[j] = _mm512_fmadd_ps(v, v, a2[j]);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      _mm512_mask_storeu_ps(s1 + c0 + 16 * j, m[j], a1[j]);
      _mm512_mask_storeu_ps(s2 + c0 + 16 * j, m[j], a2[j]);
    }
  }
}

// Channels-last, one position: y[c] = act((x + r) * a[c] + k[c]).
template <class T, bool RES, bool SILU>
static inline void cl_apply(const T* x, const T* r, const float* a, const float* k, int64_t C, T* y) {
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) st(y + c, affine<T, RES, SILU>(x, r, _mm512_loadu_ps(a + c), _mm512_loadu_ps(k + c), c));
  if (c < C) {
    const __mmask16 m = (__mmask16)((1u << (C - c)) - 1);
    __m512 u = ld(x + c, m);
    if (RES) u = _mm512_add_ps(u, ld(r + c, m));
    __m512 z = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, k + c));
    if (SILU) z = silu<lowp<T>()>(z);
    st(y + c, z, m);
  }
}

// sigmoid(z) and d silu / dz = s * (1 + z * (1 - s)) (the backward's activation gradient, fd_silu_grad).
template <bool LOWP>
static inline __m512 silu_grad(__m512 z) {
  const __m512 e = exp<LOWP>(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), _mm512_set1_ps(88.0f)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  __m512 s = _mm512_rcp14_ps(d);
  if (!LOWP) s = _mm512_mul_ps(s, _mm512_fnmadd_ps(d, s, _mm512_set1_ps(2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_mul_ps(s, _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one));
}

// Channels-last backward, one position: u = x + r, dz = dy * act'(u * a + k), v = u + off;
// s0[c] += dz, s1[c] += dz * v, s2[c] += v.
template <class T, bool RES, bool SILU>
static inline void cl_bwd_sums(const T* x, const T* r, const T* dy, const float* a, const float* k, const float* off,
                               int64_t C, float* s0, float* s1, float* s2) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = (C - c) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (C - c)) - 1);
    __m512 u = ld(x + c, m);
    if (RES) u = _mm512_add_ps(u, ld(r + c, m));
    __m512 dz = ld(dy + c, m);
    if (SILU) {
      const __m512 z = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, k + c));
      dz = _mm512_mul_ps(dz, silu_grad<lowp<T>()>(z));
    }
    const __m512 v = _mm512_add_ps(u, _mm512_maskz_loadu_ps(m, off + c));
    _mm512_mask_storeu_ps(s0 + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, s0 + c), dz));
    _mm512_mask_storeu_ps(s1 + c, m, _mm512_fmadd_ps(dz, v, _mm512_maskz_loadu_ps(m, s1 + c)));
    _mm512_mask_storeu_ps(s2 + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, s2 + c), v));
  }
}

// Channels-last backward, one position: dx[c] = cd[c] * dz + cb[c] * u + cc[c].
template <class T, bool RES, bool SILU>
static inline void cl_bwd_apply(const T* x, const T* r, const T* dy, const float* a, const float* k, const float* cd,
                                const float* cb, const float* cc, int64_t C, T* dx) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = (C - c) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (C - c)) - 1);
    __m512 u = ld(x + c, m);
    if (RES) u = _mm512_add_ps(u, ld(r + c, m));
    __m512 dz = ld(dy + c, m);
    if (SILU) {
      const __m512 z = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, k + c));
      dz = _mm512_mul_ps(dz, silu_grad<lowp<T>()>(z));
    }
    __m512 g = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, cd + c), dz, _mm512_maskz_loadu_ps(m, cc + c));
    g = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, cb + c), u, g);
    st(dx + c, g, m);
  }
}

// NCHW backward, one row (one channel): the sums of row_bwd_sums below, with two accumulator sets.
template <class T, bool RES, bool SILU>
static inline void row_bwd_sums(const T* x, const T* r, const T* dy, float af, float kf, float offf, int64_t n,
                                double& d0, double& d1, double& d2) {
  const __m512 a = _mm512_set1_ps(af), k = _mm512_set1_ps(kf), off = _mm512_set1_ps(offf);
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
    for (int64_t i = lo; i < hi; i += 16) {
      const __mmask16 m = (hi - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hi - i)) - 1);
      __m512 u = ld(x + i, m);
      if (RES) u = _mm512_add_ps(u, ld(r + i, m));
      __m512 dz = ld(dy + i, m);
      if (SILU) dz = _mm512_mul_ps(dz, silu_grad<lowp<T>()>(_mm512_fmadd_ps(u, a, k)));
      const __m512 v = _mm512_maskz_add_ps(m, u, off);
      s0 = _mm512_add_ps(s0, dz);
      s1 = _mm512_fmadd_ps(dz, v, s1);
      s2 = _mm512_add_ps(s2, v);
    }
    d0 += hsum(s0);
    d1 += hsum(s1);
    d2 += hsum(s2);
  }
}

// NCHW backward, one row: dx = cd * dz + cb * u + cc.
template <class T, bool RES, bool SILU>
static inline void row_bwd_apply(const T* x, const T* r, const T* dy, float af, float kf, float cdf, float cbf,
                                 float ccf, int64_t n, T* dx) {
  const __m512 a = _mm512_set1_ps(af), k = _mm512_set1_ps(kf), cd = _mm512_set1_ps(cdf), cb = _mm512_set1_ps(cbf),
               cc = _mm512_set1_ps(ccf);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = (n - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    __m512 u = ld(x + i, m);
    if (RES) u = _mm512_add_ps(u, ld(r + i, m));
    __m512 dz = ld(dy + i, m);
    if (SILU) dz = _mm512_mul_ps(dz, silu_grad<lowp<T>()>(_mm512_fmadd_ps(u, a, k)));
    st(dx + i, _mm512_fmadd_ps(cb, u, _mm512_fmadd_ps(cd, dz, cc)), m);
  }
}

// ---- the same bf16 output loops with AVX512_BF16's conversion (Isa::avx512_bf16) ----------------------------------
// vcvtneps2bf16 rounds to nearest even and keeps NaN a NaN in one instruction instead of the six of to_bf16
// (subnormal results flush to zero, below bf16's useful range). Compiled for avx512bf16 by the target attribute
// (the helpers above inline into it: their ISA is a subset); only called when the CPU has it (FdGnArgs).
#define FD_NBF16 __attribute__((target("avx512bf16")))
FD_NBF16 static inline void st_n(uint16_t* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}
FD_NBF16 static inline void st_n(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

template <bool RES, bool SILU>
FD_NBF16 static void row_apply_n(const uint16_t* x, const uint16_t* r, float af, float kf, int64_t n, uint16_t* y) {
  const __m512 a = _mm512_set1_ps(af), k = _mm512_set1_ps(kf);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 z0 = affine<uint16_t, RES, SILU>(x, r, a, k, i), z1 = affine<uint16_t, RES, SILU>(x, r, a, k, i + 16);
    st_n(y + i, z0), st_n(y + i + 16, z1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = (n - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    __m512 u = ld(x + i, m);
    if (RES) u = _mm512_add_ps(u, ld(r + i, m));
    __m512 z = _mm512_fmadd_ps(u, a, k);
    if (SILU) z = silu<true>(z);
    st_n(y + i, z, m);
  }
}

template <bool RES, bool SILU>
FD_NBF16 static void cl_apply_n(const uint16_t* x, const uint16_t* r, const float* a, const float* k, int64_t C,
                                uint16_t* y) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = (C - c) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (C - c)) - 1);
    __m512 u = ld(x + c, m);
    if (RES) u = _mm512_add_ps(u, ld(r + c, m));
    __m512 z = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, k + c));
    if (SILU) z = silu<true>(z);
    st_n(y + c, z, m);
  }
}
#undef FD_NBF16

}  // namespace v512
#endif

#if defined(FD_ISA_IS_AVX2)
// ---- explicit AVX2 + FMA versions of the hot loops ---------------------------------------------------------------
// GCC left the generic backward loops scalar (one libm expf call per element for the SiLU gradient, and the
// channels-last sums not vectorised because their stores may alias the inputs): the GroupNorm backward ran at
// half the speed of F.group_norm's backward + F.silu's. These mirror the AVX-512 versions above with 8 lanes:
// inline exp (Cephes polynomial, 2^n built in the exponent bits), rcp + one Newton step for 1 / (1 + e) (AVX2's
// rcp is only good to 2^-12), accumulators in registers, bf16 widened / rounded in registers. Tails shorter than
// a vector go through a small stack buffer.
namespace v256 {

static inline __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
// The first `n` (< 8) lanes from p, the rest zero.
template <class T>
static inline __m256 ld(const T* p, int64_t n) {
  alignas(32) float b[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; ++i) b[i] = gn::ld(p, i);
  return _mm256_load_ps(b);
}
static inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);  // quiet NaN, not rounded
  r = _mm256_srli_epi32(r, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values < 2^16: exact
}
static inline void st(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void st(uint16_t* p, __m256 v) { _mm_storeu_si128((__m128i*)p, to_bf16(v)); }
// The first `n` (< 8) lanes of v to p.
template <class T>
static inline void st(T* p, __m256 v, int64_t n) {
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  for (int64_t i = 0; i < n; ++i) gn::st(p, i, b[i]);
}
static inline __m256 ldf(const float* p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : ld(p, n); }

// exp(x) for x in [-87, 88] (callers clamp): 2^n * e^r, n = round(x / ln2), e^r by the polynomial of v512::exp,
// 2^n written into the exponent field (n + 127 in [40, 254]: a normal float).
template <bool LOWP>
static inline __m256 exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(expc::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 y, r;
  if (LOWP) {
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(expc::kLn2), x);
  } else {
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(expc::kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(expc::kLn2Lo), r);
  }
  constexpr int first = LOWP ? expc::kLowpFirst : 0;
  y = _mm256_set1_ps(expc::kP[first]);
  for (int k = first + 1; k < 6; ++k) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(expc::kP[k]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// sigmoid(z) = 1 / (1 + exp(-z)) by rcp + one Newton step; -z clamped to 88 keeps 1 + e finite.
template <bool LOWP>
static inline __m256 sigmoid(__m256 z) {
  const __m256 e = exp<LOWP>(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), _mm256_set1_ps(88.0f)));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  const __m256 q = _mm256_rcp_ps(d);
  return _mm256_mul_ps(q, _mm256_fnmadd_ps(d, q, _mm256_set1_ps(2.0f)));
}
template <bool LOWP>
static inline __m256 silu(__m256 z) { return _mm256_mul_ps(z, sigmoid<LOWP>(z)); }
// d silu / dz = s * (1 + z * (1 - s)), s = sigmoid(z) (fd_silu_grad)
template <bool LOWP>
static inline __m256 silu_grad(__m256 z) {
  const __m256 s = sigmoid<LOWP>(z), one = _mm256_set1_ps(1.0f);
  return _mm256_mul_ps(s, _mm256_fmadd_ps(z, _mm256_sub_ps(one, s), one));
}

template <class T> constexpr bool lowp() { return sizeof(T) == 2; }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// v = x (+ r) at lanes [i, i + 8) (full) or the first `left` of them.
template <class T, bool RES>
static inline __m256 load_u(const T* x, const T* r, int64_t i, int64_t left) {
  if (left >= 8) {
    const __m256 u = ld(x + i);
    return RES ? _mm256_add_ps(u, ld(r + i)) : u;
  }
  const __m256 u = ld(x + i, left);
  return RES ? _mm256_add_ps(u, ld(r + i, left)) : u;
}
template <class T>
static inline __m256 load_v(const T* p, int64_t i, int64_t left) { return left >= 8 ? ld(p + i) : ld(p + i, left); }
template <class T>
static inline void store_v(T* p, int64_t i, int64_t left, __m256 v) {
  if (left >= 8) st(p + i, v); else st(p + i, v, left);
}

// NCHW row sums (see v512::row_sums); lanes past the end add zero (masked with `off` only on valid lanes).
template <class T, bool RES>
static inline void row_sums(const T* x, const T* r, float off, int64_t n, double& d1, double& d2) {
  const __m256 o = _mm256_set1_ps(off);
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    __m256 a1 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps();
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16) {
      __m256 v = _mm256_add_ps(ld(x + i), o), u = _mm256_add_ps(ld(x + i + 8), o);
      if (RES) v = _mm256_add_ps(v, ld(r + i)), u = _mm256_add_ps(u, ld(r + i + 8));
      a1 = _mm256_add_ps(a1, v), b1 = _mm256_add_ps(b1, u);
      a2 = _mm256_fmadd_ps(v, v, a2), b2 = _mm256_fmadd_ps(u, u, b2);
    }
    for (; i < hi; i += 8) {
      const int64_t left = hi - i;
      __m256 ov = o;
      if (left < 8) {  // the offset on the valid lanes only: the others must add nothing
        alignas(32) float ob[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t j = 0; j < left; ++j) ob[j] = off;
        ov = _mm256_load_ps(ob);
      }
      const __m256 v = _mm256_add_ps(load_u<T, RES>(x, r, i, left), ov);
      a1 = _mm256_add_ps(a1, v);
      a2 = _mm256_fmadd_ps(v, v, a2);
    }
    d1 += hsum(_mm256_add_ps(a1, b1));
    d2 += hsum(_mm256_add_ps(a2, b2));
  }
}

template <class T, bool RES, bool SILU>
static inline void row_apply(const T* x, const T* r, float af, float kf, int64_t n, T* y) {
  const __m256 a = _mm256_set1_ps(af), k = _mm256_set1_ps(kf);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    __m256 z = _mm256_fmadd_ps(load_u<T, RES>(x, r, i, left), a, k);
    if (SILU) z = silu<lowp<T>()>(z);
    store_v(y, i, left, z);
  }
}

// NCHW backward sums (see the generic row_bwd_sums): lanes past the end must add nothing, so dz and v are
// zeroed there (dy loads zero; v = u + off is masked).
template <class T, bool RES, bool SILU>
static inline void row_bwd_sums(const T* x, const T* r, const T* dy, float af, float kf, float offf, int64_t n,
                                double& d0, double& d1, double& d2) {
  const __m256 a = _mm256_set1_ps(af), k = _mm256_set1_ps(kf), off = _mm256_set1_ps(offf);
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = imin(n, lo + kBlock);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps();
    for (int64_t i = lo; i < hi; i += 8) {
      const int64_t left = hi - i;
      const __m256 u = load_u<T, RES>(x, r, i, left);
      __m256 dz = load_v(dy, i, left);
      if (SILU) dz = _mm256_mul_ps(dz, silu_grad<lowp<T>()>(_mm256_fmadd_ps(u, a, k)));
      __m256 v = _mm256_add_ps(u, off);
      if (left < 8) {
        alignas(32) float mb[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t j = 0; j < left; ++j) mb[j] = 1.f;
        v = _mm256_mul_ps(v, _mm256_load_ps(mb));
      }
      s0 = _mm256_add_ps(s0, dz);
      s1 = _mm256_fmadd_ps(dz, v, s1);
      s2 = _mm256_add_ps(s2, v);
    }
    d0 += hsum(s0);
    d1 += hsum(s1);
    d2 += hsum(s2);
  }
}

template <class T, bool RES, bool SILU>
static inline void row_bwd_apply(const T* x, const T* r, const T* dy, float af, float kf, float cdf, float cbf,
                                 float ccf, int64_t n, T* dx) {
  const __m256 a = _mm256_set1_ps(af), k = _mm256_set1_ps(kf), cd = _mm256_set1_ps(cdf), cb = _mm256_set1_ps(cbf),
               cc = _mm256_set1_ps(ccf);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    const __m256 u = load_u<T, RES>(x, r, i, left);
    __m256 dz = load_v(dy, i, left);
    if (SILU) dz = _mm256_mul_ps(dz, silu_grad<lowp<T>()>(_mm256_fmadd_ps(u, a, k)));
    store_v(dx, i, left, _mm256_fmadd_ps(cb, u, _mm256_fmadd_ps(cd, dz, cc)));
  }
}

// Channels-last forward sums over positions [0, np) of a chunk (row stride C) for one block of 8 channels
// (FULL) or the last `left` < 8: s1 = sum v, s2 = sum v^2, v = x + r + off. One block a pass over the chunk
// keeps the accumulators in registers (a per-position loop over all C would load and store them for every
// vector); the chunk is sized to stay in L2 across the passes. Lanes past C hold zeros and are not stored.
template <class T, bool RES, bool FULL>
static inline void cl_sums_block(const T* x, const T* r, const float* off, int64_t C, int64_t np, int64_t left,
                                 float* s1, float* s2) {
  const __m256 o = FULL ? _mm256_loadu_ps(off) : ld(off, left);
  __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
  for (int64_t q = 0; q < np; ++q) {
    const __m256 v = _mm256_add_ps(load_u<T, RES>(x, r, q * C, FULL ? 8 : left), o);
    a1 = _mm256_add_ps(a1, v);
    a2 = _mm256_fmadd_ps(v, v, a2);
  }
  store_v(s1, 0, FULL ? 8 : left, a1);
  store_v(s2, 0, FULL ? 8 : left, a2);
}

template <class T, bool RES>
static inline void cl_sums_chunk(const T* x, const T* r, const float* off, int64_t C, int64_t np, float* s1,
                                 float* s2) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    cl_sums_block<T, RES, true>(x + c, RES ? r + c : nullptr, off + c, C, np, 8, s1 + c, s2 + c);
  if (c < C) cl_sums_block<T, RES, false>(x + c, RES ? r + c : nullptr, off + c, C, np, C - c, s1 + c, s2 + c);
}

// Channels-last, one position: y[c] = act((x + r) * a[c] + k[c]).
template <class T, bool RES, bool SILU>
static inline void cl_apply(const T* x, const T* r, const float* a, const float* k, int64_t C, T* y) {
  for (int64_t c = 0; c < C; c += 8) {
    const int64_t left = C - c;
    __m256 z = _mm256_fmadd_ps(load_u<T, RES>(x, r, c, left), ldf(a + c, left), ldf(k + c, left));
    if (SILU) z = silu<lowp<T>()>(z);
    store_v(y, c, left, z);
  }
}

// Channels-last backward sums over positions [0, np) of a chunk for one block of 8 channels (FULL) or the last
// `left` < 8: s0 = sum dz, s1 = sum dz * v, s2 = sum v (u = x + r, dz = dy * act'(u * a + k), v = u + off), the
// three accumulators in registers across the positions (see cl_sums_block). Lanes past C are not stored.
template <class T, bool RES, bool SILU, bool FULL>
static inline void cl_bwd_sums_block(const T* x, const T* r, const T* dy, const float* a, const float* k,
                                     const float* off, int64_t C, int64_t np, int64_t left, float* s0, float* s1,
                                     float* s2) {
  const int64_t w = FULL ? 8 : left;
  const __m256 av = ldf(a, w), kv = ldf(k, w), ov = ldf(off, w);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
  for (int64_t q = 0; q < np; ++q) {
    const __m256 u = load_u<T, RES>(x, r, q * C, w);
    __m256 dz = load_v(dy, q * C, w);
    if (SILU) dz = _mm256_mul_ps(dz, silu_grad<lowp<T>()>(_mm256_fmadd_ps(u, av, kv)));
    const __m256 v = _mm256_add_ps(u, ov);
    acc0 = _mm256_add_ps(acc0, dz);
    acc1 = _mm256_fmadd_ps(dz, v, acc1);
    acc2 = _mm256_add_ps(acc2, v);
  }
  store_v(s0, 0, w, acc0);
  store_v(s1, 0, w, acc1);
  store_v(s2, 0, w, acc2);
}

template <class T, bool RES, bool SILU>
static inline void cl_bwd_sums_chunk(const T* x, const T* r, const T* dy, const float* a, const float* k,
                                     const float* off, int64_t C, int64_t np, float* s0, float* s1, float* s2) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    cl_bwd_sums_block<T, RES, SILU, true>(x + c, RES ? r + c : nullptr, dy + c, a + c, k + c, off + c, C, np, 8,
                                          s0 + c, s1 + c, s2 + c);
  if (c < C)
    cl_bwd_sums_block<T, RES, SILU, false>(x + c, RES ? r + c : nullptr, dy + c, a + c, k + c, off + c, C, np,
                                           C - c, s0 + c, s1 + c, s2 + c);
}

// Channels-last backward, one position: dx[c] = cd[c] * dz + cb[c] * u + cc[c].
template <class T, bool RES, bool SILU>
static inline void cl_bwd_apply(const T* x, const T* r, const T* dy, const float* a, const float* k, const float* cd,
                                const float* cb, const float* cc, int64_t C, T* dx) {
  for (int64_t c = 0; c < C; c += 8) {
    const int64_t left = C - c;
    const __m256 u = load_u<T, RES>(x, r, c, left);
    __m256 dz = load_v(dy, c, left);
    if (SILU) dz = _mm256_mul_ps(dz, silu_grad<lowp<T>()>(_mm256_fmadd_ps(u, ldf(a + c, left), ldf(k + c, left))));
    const __m256 g = _mm256_fmadd_ps(ldf(cb + c, left), u, _mm256_fmadd_ps(ldf(cd + c, left), dz, ldf(cc + c, left)));
    store_v(dx, c, left, g);
  }
}

}  // namespace v256
#endif

// ---- NCHW rows -----------------------------------------------------------------------------------------------

// Shifted sums of v = x (+ r) + add over one row: s1 = sum(v - shift), s2 = sum((v - shift)^2), shift = v[0].
template <class T, bool RES>
static inline void row_sums(const T* x, const T* r, float add, int64_t n, float& shift, float& s1, float& s2) {
  shift = ld(x, 0) + (RES ? ld(r, 0) : 0.f) + add;
  const float off = add - shift;
  double d1 = 0, d2 = 0;
#if defined(FD_ISA_IS_AVX512)
  v512::row_sums<T, RES>(x, r, off, n, d1, d2);
  s1 = static_cast<float>(d1);
  s2 = static_cast<float>(d2);
  return;
#elif defined(FD_ISA_IS_AVX2)
  v256::row_sums<T, RES>(x, r, off, n, d1, d2);
  s1 = static_cast<float>(d1);
  s2 = static_cast<float>(d2);
  return;
#endif
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
static inline void row_apply(const T* x, const T* r, float a, float k, int64_t n, T* y, bool native_bf16) {
#if defined(FD_ISA_IS_AVX512)
  if constexpr (sizeof(T) == 2) {
    if (native_bf16) return v512::row_apply_n<RES, SILU>(x, r, a, k, n, y);
  }
  v512::row_apply<T, RES, SILU>(x, r, a, k, n, y);
  return;
#elif defined(FD_ISA_IS_AVX2)
  v256::row_apply<T, RES, SILU>(x, r, a, k, n, y);
  return;
#endif
  (void)native_bf16;
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
#if defined(FD_ISA_IS_AVX512)
  v512::row_bwd_sums<T, RES, SILU>(x, r, dy, a, k, off, n, d0, d1, d2);
  sdz = static_cast<float>(d0);
  sdzv = static_cast<float>(d1);
  sv = static_cast<float>(d2);
  return;
#elif defined(FD_ISA_IS_AVX2)
  v256::row_bwd_sums<T, RES, SILU>(x, r, dy, a, k, off, n, d0, d1, d2);
  sdz = static_cast<float>(d0);
  sdzv = static_cast<float>(d1);
  sv = static_cast<float>(d2);
  return;
#endif
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
#if defined(FD_ISA_IS_AVX512)
  v512::row_bwd_apply<T, RES, SILU>(x, r, dy, a, k, cd, cb, cc, n, dx);
  return;
#elif defined(FD_ISA_IS_AVX2)
  v256::row_bwd_apply<T, RES, SILU>(x, r, dy, a, k, cd, cb, cc, n, dx);
  return;
#endif
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
      row_apply<T, RES, SILU>(x + row, RES ? r + row : nullptr, a, k, n, y + row, p.native_bf16);
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
#if defined(FD_ISA_IS_AVX512)
    v512::cl_sums_chunk<T, RES>(xb + p0 * C, RES ? rb + p0 * C : nullptr, off, C, p1 - p0, s1, s2);
    continue;
#elif defined(FD_ISA_IS_AVX2)
    v256::cl_sums_chunk<T, RES>(xb + p0 * C, RES ? rb + p0 * C : nullptr, off, C, p1 - p0, s1, s2);
    continue;
#endif
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
#if defined(FD_ISA_IS_AVX512)
      if constexpr (sizeof(T) == 2) {
        if (p.native_bf16) {
          v512::cl_apply_n<RES, SILU>(x + o, RES ? r + o : nullptr, a, k, C, y + o);
          continue;
        }
      }
      v512::cl_apply<T, RES, SILU>(x + o, RES ? r + o : nullptr, a, k, C, y + o);
      continue;
#elif defined(FD_ISA_IS_AVX2)
      v256::cl_apply<T, RES, SILU>(x + o, RES ? r + o : nullptr, a, k, C, y + o);
      continue;
#endif
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
  // __restrict: for T = float, the stores to the partial sums could otherwise alias x / dy (same type), which
  // keeps GCC from vectorising the loop over channels (measured 2.7x slower than the bf16 instance).
  const T* __restrict x = static_cast<const T*>(p.x);
  const T* __restrict r = static_cast<const T*>(p.r);
  const T* __restrict dy = static_cast<const T*>(p.dy);
  const int64_t C = p.C, cpg = C / p.G;
  Buf offbuf(C);
  float* off = offbuf.p;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const float* __restrict a = p.ca + b * C;
    const float* __restrict k = p.ka + b * C;
    for (int64_t c = 0; c < C; ++c) off[c] = (p.rc ? p.rc[b * C + c] : 0.f) - p.mean[b * p.G + c / cpg];
    const float* __restrict offr = off;
    float* __restrict s0 = p.part + t * 3 * C;
    float* __restrict s1 = s0 + C;
    float* __restrict s2 = s1 + C;
#if defined(FD_ISA_IS_AVX2)
    {
      const int64_t o = (b * p.n + p0) * C;
      v256::cl_bwd_sums_chunk<T, RES, SILU>(x + o, RES ? r + o : nullptr, dy + o, a, k, offr, C, p1 - p0, s0, s1, s2);
      continue;
    }
#endif
    for (int64_t c = 0; c < 3 * C; ++c) s0[c] = 0.f;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t o = (b * p.n + q) * C;
#if defined(FD_ISA_IS_AVX512)
      v512::cl_bwd_sums<T, RES, SILU>(x + o, RES ? r + o : nullptr, dy + o, a, k, offr, C, s0, s1, s2);
      continue;
#endif
      for (int64_t c = 0; c < C; ++c) {
        const float u = ld(x, o + c) + (RES ? ld(r, o + c) : 0.f);
        const float dz = fd_gn_dz(ld(dy, o + c), u * a[c] + k[c], SILU);
        const float v = u + offr[c];
        s0[c] += dz;
        s1[c] += dz * v;
        s2[c] += v;
      }
    }
  }
}

template <class T, bool RES, bool SILU>
static void bwd_cl_apply(const FdGnArgs& p, int64_t lo, int64_t hi) {
  const T* __restrict x = static_cast<const T*>(p.x);
  const T* __restrict r = static_cast<const T*>(p.r);
  const T* __restrict dy = static_cast<const T*>(p.dy);
  T* __restrict dx = static_cast<T*>(p.y);
  const int64_t C = p.C;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / p.nchunk, j = t % p.nchunk;
    const int64_t p0 = j * p.chunk, p1 = imin(p.n, p0 + p.chunk);
    const float *__restrict a = p.ca + b * C, *__restrict k = p.ka + b * C, *__restrict cd = p.cd + b * C,
                *__restrict cb = p.cb + b * C, *__restrict cc = p.cc + b * C;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t o = (b * p.n + q) * C;
#if defined(FD_ISA_IS_AVX512)
      v512::cl_bwd_apply<T, RES, SILU>(x + o, RES ? r + o : nullptr, dy + o, a, k, cd, cb, cc, C, dx + o);
      continue;
#elif defined(FD_ISA_IS_AVX2)
      v256::cl_bwd_apply<T, RES, SILU>(x + o, RES ? r + o : nullptr, dy + o, a, k, cd, cb, cc, C, dx + o);
      continue;
#endif
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
